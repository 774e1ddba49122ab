"""Sensory memory, second half: a per-user buffer of compressed turns cut into topic segments.

The buffer holds about ``buffer_tokens`` encoder tokens (512 by default, the encoder's window).
When the next turn would overflow it, the buffer is cut where two signals agree, as in LightMem:

- **attention boundaries**: one encoder pass over the buffered turns; for each turn i the share of
  its attention (to earlier turns) that goes to turn i-1, normalised over all earlier turns; a
  local maximum of that share marks a boundary before turn i;
- **similarity drops**: cosine similarity of consecutive turn embeddings below a threshold that
  starts at 0.2 and rises by 0.05 up to 0.5 until at least one drop appears.

A similarity drop is kept when it lies within ±``window_turns`` of an attention boundary. With too
few turns for an attention maximum (fewer than four), similarity drops alone decide. Units are
single turns, so any sequence of roles works (not only strict user/assistant alternation).
Segments before the last boundary are emitted; the tail stays buffered to continue its topic
while it fills at most half the buffer, otherwise it is emitted too (bounding how often a turn is
re-read by the attention pass).

Pure functions over ``SensoryBufferState``; the model work sits behind ``Segmenter``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from schemas import CompressedTurn, SensoryBufferState, TopicSegment
from streams import ids, seqmarks
from streams.settings import SegmentationSettings

BoundaryKind = Literal["attention+similarity", "similarity", "single", "oversize", "flush"]


def turn_label(turn: CompressedTurn) -> str:
    """The text a turn contributes to segmentation (and, offline, to its fact): speaker + compressed text,
    whitespace collapsed to single spaces."""
    who = turn.speaker or turn.role
    return f"{who}: {' '.join((turn.compressed_text or turn.raw_text).split())}"


class Segmenter:
    """Finds topic boundaries in a list of turn texts with an encoder's attention and embeddings."""

    def __init__(
        self,
        settings: SegmentationSettings,
        attention: Callable[[Sequence[str], Sequence[int] | None], tuple[np.ndarray, list[tuple[int, int]]]],
        embed: Callable[[Sequence[str]], np.ndarray],
    ) -> None:
        self.settings = settings
        self._attention = attention
        self._embed = embed

    def attention_scores(self, texts: Sequence[str]) -> np.ndarray:
        """s[i] = share of turn i's attention to earlier turns that lands on turn i-1 (s[0] = nan)."""
        att, spans = self._attention(texts, self.settings.attention_layers)
        n = len(texts)
        scores = np.full(n, np.nan)
        for i in range(1, n):
            a, b = spans[i]
            if b <= a:
                continue
            per_prev = np.array([att[a:b, s:e].sum(axis=1).mean() if e > s else 0.0 for s, e in spans[:i]])
            total = per_prev.sum()
            if total > 0:
                scores[i] = per_prev[-1] / total
        return scores

    def attention_boundaries(self, texts: Sequence[str]) -> list[int]:
        s = self.attention_scores(texts)
        return [
            i
            for i in range(2, len(texts) - 1)
            if np.isfinite(s[i - 1]) and np.isfinite(s[i]) and np.isfinite(s[i + 1]) and s[i - 1] < s[i] > s[i + 1]
        ]

    def similarity_boundaries(self, texts: Sequence[str]) -> list[int]:
        if len(texts) < 2:
            return []
        v = self._embed(texts)
        sims = np.einsum("ij,ij->i", v[:-1], v[1:])  # vectors are normalised
        st = self.settings
        steps = int(round((st.sim_threshold_max - st.sim_threshold_start) / st.sim_threshold_step))
        for k in range(steps + 1):
            threshold = st.sim_threshold_start + k * st.sim_threshold_step
            cuts = [i + 1 for i, sim in enumerate(sims) if sim < threshold]
            if cuts:
                return cuts
        return []

    def boundaries(self, texts: Sequence[str]) -> tuple[list[int], BoundaryKind]:
        """Cut positions (a cut at i starts a new segment at turn i) and which rule produced them."""
        if len(texts) < 2:
            return [], "single"
        sim_cuts = self.similarity_boundaries(texts)
        if not sim_cuts:
            return [], "single"
        if len(texts) < 4:
            return sim_cuts, "similarity"
        att_cuts = self.attention_boundaries(texts)
        w = self.settings.window_turns
        agreed = [c for c in sim_cuts if any(abs(c - a) <= w for a in att_cuts)]
        return agreed, ("attention+similarity" if agreed else "single")


def make_segment(user_id: str, turns: Sequence[CompressedTurn], boundary: BoundaryKind) -> TopicSegment:
    return TopicSegment(
        segment_id=ids.segment_id(user_id, [t.turn_id for t in turns]),
        user_id=user_id,
        turns=list(turns),
        tokens=sum(t.compressed_tokens for t in turns),
        boundary=boundary,
    )


def _state(user_id: str, turns: Sequence[CompressedTurn], last_seq: dict[str, int]) -> SensoryBufferState:
    return SensoryBufferState(
        user_id=user_id, turns=list(turns), encoder_tokens=sum(t.encoder_tokens for t in turns), last_seq=last_seq
    )


def cut(
    state: SensoryBufferState, segmenter: Segmenter, *, force: bool
) -> tuple[list[TopicSegment], SensoryBufferState]:
    """Cut the buffer at its topic boundaries. ``force`` emits the tail too (on-demand flush)."""
    turns = state.turns
    if not turns:
        return [], state
    positions, kind = segmenter.boundaries([turn_label(t) for t in turns])
    pieces: list[list[CompressedTurn]] = []
    start = 0
    for p in sorted(set(positions)):
        if 0 < p < len(turns):
            pieces.append(turns[start:p])
            start = p
    tail = turns[start:]
    segments = [make_segment(state.user_id, piece, kind) for piece in pieces]
    if force or not pieces:
        segments.append(make_segment(state.user_id, tail, "flush" if force and pieces else kind))
        tail = []
    return segments, _state(state.user_id, tail, state.last_seq)


def segment(
    state: SensoryBufferState, turn: CompressedTurn, segmenter: Segmenter
) -> tuple[list[TopicSegment], SensoryBufferState]:
    """Add one turn to a user's sensory buffer; return the segments this closes and the new buffer."""
    if turn.user_id != state.user_id:
        raise ValueError(f"turn of user {turn.user_id!r} added to the buffer of {state.user_id!r}")
    if seqmarks.taken(state.last_seq, turn) or any(t.turn_id == turn.turn_id for t in state.turns):
        return [], state  # redelivery (a re-produced or re-consumed turn): already taken
    marks = seqmarks.advance(state.last_seq, [turn])
    limit = segmenter.settings.buffer_tokens
    out: list[TopicSegment] = []
    if state.turns and state.encoder_tokens + turn.encoder_tokens > limit:
        out, state = cut(state, segmenter, force=False)
        # The kept tail has no boundary inside (it was just analysed). Keep it to continue its topic only
        # while it is small; otherwise emit it, so no turn is re-read by more than two attention passes.
        if state.turns and (state.encoder_tokens > limit // 2 or state.encoder_tokens + turn.encoder_tokens > limit):
            out.append(make_segment(state.user_id, state.turns, "flush"))
            state = _state(state.user_id, [], state.last_seq)
    if not state.turns and turn.encoder_tokens > limit:
        out.append(make_segment(state.user_id, [turn], "oversize"))
        return out, _state(state.user_id, [], marks)
    return out, _state(state.user_id, [*state.turns, turn], marks)


def flush(state: SensoryBufferState, segmenter: Segmenter) -> tuple[list[TopicSegment], SensoryBufferState]:
    """Emit everything buffered (on demand or after an idle timeout), still cut at topic boundaries."""
    return cut(state, segmenter, force=True)
