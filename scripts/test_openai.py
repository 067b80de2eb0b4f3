#!/usr/bin/env python3
"""Checks Cohort's OpenAI-compatible API with OpenAI's own Python client (`openai`).

Usage: scripts/test_openai.py BASE_URL   (e.g. http://127.0.0.1:8080)

The node must serve the embedding model `tinybert` (engine candle-bert). Run by
node/tests/openai.rs against a node it starts. Exits non-zero on any mismatch.

What the client does with `encoding_format` (openai >= 1.x):
- not given: it asks the server for `base64` and decodes the vectors to lists of floats;
- `"float"`: it asks for floats and returns them as they came;
- `"base64"`: it returns the server's base64 strings untouched.
All three are checked against the native endpoint's vectors, fetched with urllib.
"""

import base64
import json
import struct
import sys
import urllib.request

from openai import OpenAI, BadRequestError, NotFoundError

MODEL = "tinybert"
SENTENCES = [
    "This is an example sentence.",
    "The cat is happy.",
    "Hello, world!",
    "Café au lait",
]
TOLERANCE = 1e-5


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def native(base, texts):
    req = urllib.request.Request(
        f"{base}/api/v1/models/{MODEL}/infer",
        data=json.dumps({"inputs": {"text": texts}}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as res:
        body = json.load(res)
    return body["outputs"]["embedding"]


def decode(b64):
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def same(name, got, want):
    if len(got) != len(want):
        fail(f"{name}: {len(got)} vectors, expected {len(want)}")
    for i, (g, w) in enumerate(zip(got, want)):
        if len(g) != len(w):
            fail(f"{name}[{i}]: width {len(g)}, expected {len(w)}")
        worst = max(abs(a - b) for a, b in zip(g, w))
        if worst > TOLERANCE:
            fail(f"{name}[{i}]: differs from the native endpoint by {worst}")


def main():
    if len(sys.argv) != 2:
        fail("usage: test_openai.py BASE_URL")
    base = sys.argv[1].rstrip("/")
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    want = native(base, SENTENCES)

    # Models.
    ids = [m.id for m in client.models.list()]
    if MODEL not in ids:
        fail(f"models.list() lacks {MODEL}: {ids}")
    for m in client.models.list():
        if m.owned_by != "cohort" or m.object != "model" or not m.created:
            fail(f"bad model entry {m}")

    # Default: the client asks for base64 and decodes it to floats.
    res = client.embeddings.create(model=MODEL, input=SENTENCES)
    if res.model != MODEL or res.object != "list":
        fail(f"bad response header: {res.model} {res.object}")
    if [d.index for d in res.data] != list(range(len(SENTENCES))):
        fail(f"indices out of order: {[d.index for d in res.data]}")
    if not all(isinstance(d.embedding, list) for d in res.data):
        fail("default encoding did not give lists of floats")
    same("default", [d.embedding for d in res.data], want)
    if res.usage.prompt_tokens <= 0 or res.usage.total_tokens != res.usage.prompt_tokens:
        fail(f"bad usage {res.usage}")

    # Explicit float.
    res = client.embeddings.create(model=MODEL, input=SENTENCES, encoding_format="float")
    same("float", [d.embedding for d in res.data], want)

    # Explicit base64: the client hands back the strings; decode them here.
    res = client.embeddings.create(model=MODEL, input=SENTENCES, encoding_format="base64")
    if not all(isinstance(d.embedding, str) for d in res.data):
        fail("encoding_format=base64 did not give strings")
    same("base64", [decode(d.embedding) for d in res.data], want)

    # A single string, and the model's own width as `dimensions`.
    width = len(want[0])
    res = client.embeddings.create(model=MODEL, input=SENTENCES[1], dimensions=width)
    same("single", [res.data[0].embedding], [want[1]])

    # Errors the client raises.
    try:
        client.embeddings.create(model="no-such-model", input="x")
        fail("unknown model accepted")
    except NotFoundError as e:
        if e.code != "model_not_found":
            fail(f"unknown model: code {e.code}")
    try:
        client.embeddings.create(model=MODEL, input="x", dimensions=width + 1)
        fail("wrong dimensions accepted")
    except BadRequestError as e:
        if e.param != "dimensions":
            fail(f"wrong dimensions: param {e.param}")
    try:
        client.embeddings.create(model=MODEL, input=[[1, 2, 3]])
        fail("token-id input accepted")
    except BadRequestError as e:
        if e.param != "input":
            fail(f"token ids: param {e.param}")

    print("ok: openai client", getattr(sys.modules["openai"], "__version__", "?"))


if __name__ == "__main__":
    main()
