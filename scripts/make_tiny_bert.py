#!/usr/bin/env python3
"""Writes a tiny random BERT sentence-embedding model in the sentence-transformers layout.

Usage: scripts/make_tiny_bert.py OUTDIR [--seed N]

OUTDIR receives:
  config.json             a BERT config (hidden 32, 2 layers, 4 heads, intermediate 64,
                          max_position_embeddings 64)
  model.safetensors       random F32 weights (no `bert.` prefix) plus an I64
                          `embeddings.position_ids` buffer, as Hugging Face checkpoints have
  tokenizer.json          a Hugging Face `tokenizers` file: BertNormalizer (lowercase),
                          BertPreTokenizer, WordPiece over a ~100-token vocabulary,
                          TemplateProcessing `[CLS] $A [SEP]`. Like all-MiniLM-L6-v2's, it
                          pads every input to a fixed length and truncates beyond the model's
                          maximum: an engine must turn both off / down.
  1_Pooling/config.json   mean pooling
  sentence_bert_config.json  (absent on purpose: the engine's default is then the model's
                          max_position_embeddings)

Weights are drawn from numpy's PCG64 with a fixed seed, so the output is reproducible. The
safetensors file is written by hand (an 8-byte little-endian header length, a JSON header,
then the raw little-endian tensor bytes); the only dependency is numpy.

The fixture engines/tests/fixtures/tiny_bert/ was written with:
  scripts/make_tiny_bert.py engines/tests/fixtures/tiny_bert
"""

import argparse
import json
import os
import struct
import sys

import numpy as np

HIDDEN = 32
LAYERS = 2
HEADS = 4
INTERMEDIATE = 64
MAX_POSITION = 64
TYPE_VOCAB = 2

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PUNCT = [".", ",", "!", "?", "'", "-", ":", "(", ")"]
WORDS = """
the a an this that is are was be it i you he she we they of to in on at for with and or
not no yes cat dog bird fish house car tree sun moon day night time man woman child
sentence example test model cohort server token text word fast slow big small good bad
red blue green happy sad run walk play eat sleep read write cafe new old hello world
""".split()
SUBWORDS = ["##s", "##ing", "##ed", "##er", "##ly", "##est", "##y", "##n", "##t", "##e"]

VOCAB = SPECIAL + PUNCT + WORDS + SUBWORDS

DTYPES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64"}


def write_safetensors(path, tensors):
    """tensors: list of (name, numpy array). Writes them in order, 8-byte aligned header."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    blobs = []
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr)
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        if arr.dtype not in DTYPES:
            raise ValueError(f"{name}: unsupported dtype {arr.dtype}")
        raw = arr.tobytes()
        header[name] = {
            "dtype": DTYPES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        offset += len(raw)
        blobs.append(raw)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for raw in blobs:
            f.write(raw)
    os.replace(tmp, path)


def weights(seed):
    rng = np.random.default_rng(seed)

    def normal(*shape, scale):
        return (rng.standard_normal(shape) * scale).astype("<f4")

    def layer_norm(prefix):
        return [
            (f"{prefix}.weight", (1.0 + rng.standard_normal(HIDDEN) * 0.1).astype("<f4")),
            (f"{prefix}.bias", normal(HIDDEN, scale=0.05)),
        ]

    def linear(prefix, n_in, n_out):
        return [
            (f"{prefix}.weight", normal(n_out, n_in, scale=1.0 / np.sqrt(n_in))),
            (f"{prefix}.bias", normal(n_out, scale=0.05)),
        ]

    t = [
        ("embeddings.word_embeddings.weight", normal(len(VOCAB), HIDDEN, scale=0.5)),
        ("embeddings.position_embeddings.weight", normal(MAX_POSITION, HIDDEN, scale=0.2)),
        ("embeddings.token_type_embeddings.weight", normal(TYPE_VOCAB, HIDDEN, scale=0.2)),
        ("embeddings.position_ids", np.arange(MAX_POSITION, dtype="<i8").reshape(1, -1)),
    ]
    t += layer_norm("embeddings.LayerNorm")
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        t += linear(f"{p}.attention.self.query", HIDDEN, HIDDEN)
        t += linear(f"{p}.attention.self.key", HIDDEN, HIDDEN)
        t += linear(f"{p}.attention.self.value", HIDDEN, HIDDEN)
        t += linear(f"{p}.attention.output.dense", HIDDEN, HIDDEN)
        t += layer_norm(f"{p}.attention.output.LayerNorm")
        t += linear(f"{p}.intermediate.dense", HIDDEN, INTERMEDIATE)
        t += linear(f"{p}.output.dense", INTERMEDIATE, HIDDEN)
        t += layer_norm(f"{p}.output.LayerNorm")
    # A pooler, as BERT checkpoints carry; sentence embeddings do not use it.
    t += linear("pooler.dense", HIDDEN, HIDDEN)
    return t


def config():
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": MAX_POSITION,
        "model_type": "bert",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "type_vocab_size": TYPE_VOCAB,
        "use_cache": True,
        "vocab_size": len(VOCAB),
    }


def tokenizer():
    ids = {tok: i for i, tok in enumerate(VOCAB)}
    if len(ids) != len(VOCAB):
        raise ValueError("duplicate token in the vocabulary")
    added = [
        {
            "id": ids[tok],
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for tok in SPECIAL
    ]
    return {
        "version": "1.0",
        # The traps of all-MiniLM-L6-v2's tokenizer.json, on purpose: truncation beyond the
        # model's positions and padding of every input to a fixed length.
        "truncation": {"direction": "Right", "max_length": 128, "strategy": "LongestFirst", "stride": 0},
        "padding": {
            "strategy": {"Fixed": 48},
            "direction": "Right",
            "pad_to_multiple_of": None,
            "pad_id": 0,
            "pad_type_id": 0,
            "pad_token": "[PAD]",
        },
        "added_tokens": added,
        "normalizer": {
            "type": "BertNormalizer",
            "clean_text": True,
            "handle_chinese_chars": True,
            "strip_accents": None,
            "lowercase": True,
        },
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
                {"SpecialToken": {"id": "[SEP]", "type_id": 1}},
            ],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [ids["[CLS]"]], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [ids["[SEP]"]], "tokens": ["[SEP]"]},
            },
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {
            "type": "WordPiece",
            "unk_token": "[UNK]",
            "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100,
            "vocab": ids,
        },
    }


def pooling():
    return {
        "word_embedding_dimension": HIDDEN,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--seed", type=int, default=20240607)
    args = ap.parse_args(argv)

    os.makedirs(os.path.join(args.outdir, "1_Pooling"), exist_ok=True)
    write_json(os.path.join(args.outdir, "config.json"), config())
    write_json(os.path.join(args.outdir, "tokenizer.json"), tokenizer())
    write_json(os.path.join(args.outdir, "1_Pooling", "config.json"), pooling())
    write_safetensors(os.path.join(args.outdir, "model.safetensors"), weights(args.seed))
    print(f"tiny BERT written to {args.outdir} (vocab {len(VOCAB)}, hidden {HIDDEN})")


if __name__ == "__main__":
    main(sys.argv[1:])
