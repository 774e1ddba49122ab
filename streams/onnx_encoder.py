"""The sentence encoder's transformer run by ONNX Runtime: the same vectors as PyTorch (cosine ≥ 0.99, checked by
the tests on benchmark texts), at a fraction of the per-query cost.

The ONNX graph is exported from the model's own weights on first use (nothing is downloaded) and cached under
``$XDG_CACHE_HOME/lightmem/onnx/<key>/model.onnx`` (default ``~/.cache``), keyed by the model directory, its
weights' size and modification time, and the torch/transformers versions. The export uses eager attention: the
fused SDPA path does not trace to a graph that is correct for every sequence length. int8 dynamic quantisation
was measured and rejected: its vectors fall to cosine 0.97 of PyTorch's.

Only models whose sentence-transformers pipeline is transformer → mean pooling → normalise qualify (MiniLM and
most sentence-transformers models); for any other, ``OnnxTransformer.for_model`` returns None and the caller
keeps PyTorch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EXPORT_VERSION = "1"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lightmem" / "onnx"


def mean_pooled(model_path: Path) -> bool:
    """Whether the sentence-transformers pipeline at ``model_path`` is transformer → mean pooling → normalise."""
    try:
        modules = json.loads((model_path / "modules.json").read_text())
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        pooling = next(m for m in modules if m["type"].endswith("Pooling"))
        config = json.loads((model_path / pooling["path"] / "config.json").read_text())
    except (OSError, ValueError, KeyError, StopIteration):
        return False
    modes = {k: v for k, v in config.items() if k.startswith("pooling_mode_")}
    only_mean = modes.get("pooling_mode_mean_tokens") is True and sum(bool(v) for v in modes.values()) == 1
    return kinds == ["Transformer", "Pooling", "Normalize"] and only_mean


def _cache_key(model_path: Path) -> str:
    import torch
    import transformers

    stamps = sorted(
        f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in model_path.iterdir()
        if p.suffix in (".safetensors", ".bin", ".json")
    )
    text = "|".join([EXPORT_VERSION, str(model_path.resolve()), torch.__version__, transformers.__version__, *stamps])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def export(model_path: Path, target: Path) -> None:
    """Export the transformer at ``model_path`` (eager attention, dynamic batch and length) to ``target``."""
    import torch
    from filelock import FileLock
    from transformers import AutoModel, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.exists():
            return  # another process exported it meanwhile
        model = AutoModel.from_pretrained(str(model_path), attn_implementation="eager", local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)

        class _Hidden(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
                out = self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
                return out.last_hidden_state

        sample = tokenizer(["an example", "a second, longer example sentence"], padding=True, return_tensors="pt")
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        axes = {name: {0: "batch", 1: "tokens"} for name in (*INPUTS, "last_hidden_state")}
        with torch.inference_mode():
            torch.onnx.export(
                _Hidden(model),
                tuple(sample[name] for name in INPUTS),
                str(tmp),
                input_names=list(INPUTS),
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
            )
        os.replace(tmp, target)
        log.info("exported %s to ONNX at %s", model_path, target)


class OnnxTransformer:
    """Mean-pooled, L2-normalised sentence vectors from the ONNX graph of a sentence-transformers model."""

    def __init__(self, onnx_path: Path, tokenizer: Any, max_seq_length: int) -> None:
        import onnxruntime as ort

        self.path = onnx_path
        # its own copy: a fast tokenizer keeps padding/truncation state on the shared Rust object, so a caller
        # padding a batch while another thread tokenizes without padding gets ragged rows
        self.tokenizer = copy.deepcopy(tokenizer)
        self._lock = threading.Lock()
        self.max_seq_length = max_seq_length
        self._sessions: dict[int, Any] = {}
        self._ort = ort

    @classmethod
    def for_model(cls, model_path: Path, tokenizer: Any, max_seq_length: int) -> OnnxTransformer | None:
        """The exported graph of ``model_path`` (exporting it on first use), or None when the model does not
        qualify or the export fails (the caller then keeps PyTorch)."""
        if not mean_pooled(model_path):
            return None
        target = cache_root() / _cache_key(model_path) / "model.onnx"
        try:
            if not target.exists():
                export(model_path, target)
            return cls(target, tokenizer, max_seq_length)
        except Exception as exc:  # noqa: BLE001 - any export/runtime failure means "use PyTorch"
            log.warning("ONNX encoder unavailable (%s: %s); using PyTorch", type(exc).__name__, exc)
            return None

    def _session(self, threads: int) -> Any:
        if threads not in self._sessions:
            options = self._ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._sessions[threads] = self._ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        return self._sessions[threads]

    def embed(self, texts: list[str], threads: int = 1) -> np.ndarray:
        """One L2-normalised float32 row per text (texts padded together: pass similar lengths for speed)."""
        with self._lock:
            enc = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="np"
            )
            session = self._session(threads)
        feeds = {name: np.asarray(enc[name], dtype=np.int64) for name in INPUTS if name in enc}
        if "token_type_ids" not in feeds:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        hidden = session.run(None, feeds)[0]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
