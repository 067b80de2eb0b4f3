#!/usr/bin/env python3
"""A reference for the candle-bert engine, independent of candle and of `tokenizers`.

Usage:
  scripts/bert_reference.py MODEL_DIR [options] SENTENCE...

MODEL_DIR is a sentence-transformers directory (config.json, model.safetensors,
tokenizer.json, optional 1_Pooling/config.json and sentence_bert_config.json). Prints JSON:
  {"model": ..., "pooling": ..., "normalize": ..., "max_length": ...,
   "sentences": [...], "ids": [[...]], "embeddings": [[...]]}
With --variants, "variants" also holds the embeddings for every pooling (mean, cls, max),
each normalized and raw: {"mean": ..., "mean_raw": ..., "cls": ..., ...}.

Everything is written out with numpy only, in float64:
  - a safetensors reader (8-byte header length, JSON header, little-endian bytes);
  - BERT's basic tokenizer (clean text, CJK spacing, lowercase + strip accents, split on
    whitespace and punctuation) and greedy longest-match-first WordPiece, reading the
    vocabulary and special tokens from tokenizer.json; truncation to max_length;
  - the BERT forward pass: word + position + token-type embeddings, LayerNorm, then per layer
    masked multi-head self-attention, residual + LayerNorm, GELU (erf) feed-forward,
    residual + LayerNorm;
  - pooling over the real tokens, L2 normalization.

The fixtures were written with (--sentences-from takes the sentences of an earlier output):
  F=engines/tests/fixtures
  scripts/bert_reference.py $F/tiny_bert --variants \\
      --sentences-from $F/tiny_bert_expected.json --out $F/tiny_bert_expected.json
  scripts/bert_reference.py $F/tiny_bert --max-length 8 \\
      --sentences-from $F/tiny_bert_expected_maxlen8.json --out $F/tiny_bert_expected_maxlen8.json
"""

import argparse
import json
import math
import os
import struct
import sys
import unicodedata

import numpy as np

# ---------------------------------------------------------------------------------------
# safetensors

_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}


def read_safetensors(path):
    """Returns {name: numpy array}; BF16 is widened to float32."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[base + start : base + end]
        shape = tuple(info["shape"])
        if info["dtype"] == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif info["dtype"] in _DTYPES:
            arr = np.frombuffer(raw, dtype=_DTYPES[info["dtype"]])
        else:
            raise ValueError(f"{name}: unsupported dtype {info['dtype']}")
        out[name] = arr.reshape(shape)
    return out


# ---------------------------------------------------------------------------------------
# tokenizer


def _is_punctuation(ch):
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_whitespace(ch):
    if ch in (" ", "\t", "\n", "\r"):
        return True
    return unicodedata.category(ch) == "Zs"


def _is_control(ch):
    if ch in ("\t", "\n", "\r"):
        return False
    return unicodedata.category(ch) in ("Cc", "Cf", "Cn", "Co", "Cs")


def _is_cjk(cp):
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


class WordPieceTokenizer:
    """BERT's uncased basic tokenizer + WordPiece, from a tokenizer.json."""

    def __init__(self, path):
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
        model = tj["model"]
        if model.get("type") != "WordPiece":
            raise ValueError(f"{path}: model type {model.get('type')} is not WordPiece")
        self.vocab = model["vocab"]
        self.unk = model.get("unk_token", "[UNK]")
        self.prefix = model.get("continuing_subword_prefix", "##")
        self.max_chars = model.get("max_input_chars_per_word", 100)
        norm = tj.get("normalizer") or {}
        self.lowercase = norm.get("lowercase", True)
        strip = norm.get("strip_accents")
        self.strip_accents = self.lowercase if strip is None else strip
        # [CLS] ... [SEP] from the post-processor (TemplateProcessing or BertProcessing).
        pp = tj.get("post_processor") or {}
        if pp.get("type") == "TemplateProcessing":
            toks = pp["special_tokens"]
            single = pp["single"]
            self.before = [toks[p["SpecialToken"]["id"]]["ids"][0] for p in single[:1] if "SpecialToken" in p]
            self.after = [toks[p["SpecialToken"]["id"]]["ids"][0] for p in single[-1:] if "SpecialToken" in p]
        elif pp.get("type") == "BertProcessing":
            self.before = [pp["cls"][1]]
            self.after = [pp["sep"][1]]
        else:
            self.before, self.after = [], []

    def basic(self, text):
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_whitespace(ch):
                chars.append(" ")
            elif _is_cjk(cp):
                chars.extend([" ", ch, " "])
            else:
                chars.append(ch)
        text = "".join(chars)
        if self.strip_accents:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        if self.lowercase:
            text = text.lower()
        words = []
        for chunk in text.split():
            cur = ""
            for ch in chunk:
                if _is_punctuation(ch):
                    if cur:
                        words.append(cur)
                        cur = ""
                    words.append(ch)
                else:
                    cur += ch
            if cur:
                words.append(cur)
        return words

    def wordpiece(self, word):
        if len(word) > self.max_chars:
            return [self.unk]
        pieces = []
        start = 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                sub = word[start:end]
                if start > 0:
                    sub = self.prefix + sub
                if sub in self.vocab:
                    found = sub
                    break
                end -= 1
            if found is None:
                return [self.unk]
            pieces.append(found)
            start = end
        return pieces

    def encode(self, text, max_length):
        ids = [self.vocab[p] for w in self.basic(text) for p in self.wordpiece(w)]
        room = max_length - len(self.before) - len(self.after)
        return self.before + ids[: max(room, 0)] + self.after


# ---------------------------------------------------------------------------------------
# model


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


_erf = np.vectorize(math.erf)


def activation(x, name):
    if name == "gelu":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if name in ("geluapproximate", "gelu_new", "gelu_pytorch_tanh"):
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "relu":
        return np.maximum(x, 0.0)
    raise ValueError(f"unsupported hidden_act {name}")


class Bert:
    def __init__(self, model_dir):
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            self.cfg = json.load(f)
        raw = read_safetensors(os.path.join(model_dir, "model.safetensors"))
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in raw else ""
        self.w = {k[len(prefix) :]: v.astype(np.float64) for k, v in raw.items() if k.startswith(prefix)}

    def linear(self, x, name):
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def ln(self, x, name):
        return layer_norm(x, self.w[name + ".weight"], self.w[name + ".bias"], self.cfg["layer_norm_eps"])

    def forward(self, ids):
        """ids: one sequence (no padding: a sequence alone needs no mask). -> [len, hidden]"""
        cfg, w = self.cfg, self.w
        n = len(ids)
        heads = cfg["num_attention_heads"]
        hd = cfg["hidden_size"] // heads
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:n]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self.ln(x, "embeddings.LayerNorm")
        for i in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}"
            q = self.linear(x, f"{p}.attention.self.query").reshape(n, heads, hd).transpose(1, 0, 2)
            k = self.linear(x, f"{p}.attention.self.key").reshape(n, heads, hd).transpose(1, 0, 2)
            v = self.linear(x, f"{p}.attention.self.value").reshape(n, heads, hd).transpose(1, 0, 2)
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)  # [heads, n, n]
            scores = scores - scores.max(-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(-1, keepdims=True)
            ctx = (probs @ v).transpose(1, 0, 2).reshape(n, heads * hd)
            x = self.ln(self.linear(ctx, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
            h = activation(self.linear(x, f"{p}.intermediate.dense"), cfg["hidden_act"])
            x = self.ln(self.linear(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
        return x


def pool(tokens, mode):
    if mode == "mean":
        return tokens.mean(0)
    if mode == "cls":
        return tokens[0]
    if mode == "max":
        return tokens.max(0)
    raise ValueError(f"unknown pooling {mode}")


def normalize(v):
    return v / max(np.linalg.norm(v), 1e-12)


def pooling_from_dir(model_dir):
    path = os.path.join(model_dir, "1_Pooling", "config.json")
    if not os.path.exists(path):
        return "mean"
    with open(path, encoding="utf-8") as f:
        pc = json.load(f)
    for key, mode in (
        ("pooling_mode_mean_tokens", "mean"),
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_max_tokens", "max"),
    ):
        if pc.get(key):
            return mode
    return "mean"


def default_max_length(model_dir, cfg):
    path = os.path.join(model_dir, "sentence_bert_config.json")
    m = cfg["max_position_embeddings"]
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            m = json.load(f).get("max_seq_length") or m
    return min(m, cfg["max_position_embeddings"])


def rounded(v):
    return [float(f"{x:.8g}") for x in v]


def main(argv):
    ap = argparse.ArgumentParser(description="numpy reference for candle-bert")
    ap.add_argument("model_dir")
    ap.add_argument("sentences", nargs="*")
    ap.add_argument("--sentences-from", help="take the sentences of an earlier output (JSON)")
    ap.add_argument("--pooling", choices=["mean", "cls", "max"], help="default: 1_Pooling/config.json")
    ap.add_argument("--no-normalize", action="store_true")
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--variants", action="store_true", help="also every pooling, normalized and raw")
    ap.add_argument("--out", help="write the JSON here instead of stdout")
    args = ap.parse_args(argv)

    if args.sentences_from:
        with open(args.sentences_from, encoding="utf-8") as f:
            args.sentences = json.load(f)["sentences"] + args.sentences
    if not args.sentences:
        ap.error("no sentences")

    tok = WordPieceTokenizer(os.path.join(args.model_dir, "tokenizer.json"))
    bert = Bert(args.model_dir)
    max_length = args.max_length or default_max_length(args.model_dir, bert.cfg)
    max_length = min(max_length, bert.cfg["max_position_embeddings"])
    mode = args.pooling or pooling_from_dir(args.model_dir)
    norm = not args.no_normalize

    ids = [tok.encode(s, max_length) for s in args.sentences]
    hidden = [bert.forward(i) for i in ids]

    def embed(m, n):
        return [rounded(normalize(pool(h, m)) if n else pool(h, m)) for h in hidden]

    result = {
        "model": os.path.basename(os.path.normpath(args.model_dir)),
        "pooling": mode,
        "normalize": norm,
        "max_length": max_length,
        "sentences": args.sentences,
        "ids": ids,
        "embeddings": embed(mode, norm),
    }
    if args.variants:
        result["variants"] = {}
        for m in ("mean", "cls", "max"):
            result["variants"][m] = embed(m, True)
            result["variants"][m + "_raw"] = embed(m, False)
    text = json.dumps(result, ensure_ascii=False)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
