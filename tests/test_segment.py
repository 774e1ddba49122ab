"""Sensory segmentation: boundary rules, buffer behaviour, and the real encoder on a topic shift."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from schemas import SensoryBufferState
from streams import segment as sg
from streams.settings import SegmentationSettings
from tests.factories import compressed_turn

TOPICS = {"cat": 0, "run": 1, "job": 2, "trip": 3}


def topic_embed(texts: Sequence[str]) -> np.ndarray:
    """Unit vectors by topic word; a turn with no topic word points between all topics."""
    out = np.zeros((len(texts), 4), dtype=np.float32)
    for i, t in enumerate(texts):
        hits = [v for k, v in TOPICS.items() if k in t]
        for v in hits or list(TOPICS.values()):
            out[i, v] = 1.0
        out[i] /= np.linalg.norm(out[i])
    return out


def uniform_attention(texts: Sequence[str], layers: Sequence[int] | None):
    n = len(texts)
    spans = [(1 + i, 2 + i) for i in range(n)]
    return np.ones((n + 2, n + 2)) / (n + 2), spans


def peaked_attention(peaks: set[int]):
    """Attention where turn i attends mostly to turn i-1 exactly at the given positions."""

    def attention(texts: Sequence[str], layers: Sequence[int] | None):
        n = len(texts)
        att = np.full((n + 2, n + 2), 0.01)
        for i in range(1, n):
            att[1 + i, 1 + i - 1] = 0.9 if i in peaks else 0.05
        return att, [(1 + i, 2 + i) for i in range(n)]

    return attention


def make_segmenter(attention=uniform_attention, **kw) -> sg.Segmenter:
    return sg.Segmenter(SegmentationSettings(**kw), attention, topic_embed)


def test_similarity_threshold_rises_until_a_drop_appears():
    seg = make_segmenter()
    # "cat" vs "cat run" has cosine 0.707: no cut below 0.5; "cat" vs "job" has 0: cut at 0.2
    assert seg.similarity_boundaries(["cat", "cat", "job", "job"]) == [2]
    assert seg.similarity_boundaries(["cat", "cat", "cat"]) == []
    # neutral turn: cosine with a topic turn is 0.5 -> only found once the threshold passes 0.5? no: max is 0.5
    neutral = seg.similarity_boundaries(["cat", "hello there", "cat"])
    assert neutral == []


def test_attention_boundaries_are_local_maxima():
    seg = make_segmenter(peaked_attention({3}))
    texts = [f"t{i}" for i in range(7)]
    assert seg.attention_boundaries(texts) == [3]
    scores = seg.attention_scores(texts)
    assert np.isnan(scores[0]) and scores[1] == 1.0  # turn 1 has only one earlier turn
    assert scores[3] == pytest.approx(scores[2:].max())


def test_similarity_cut_kept_only_near_an_attention_boundary():
    texts = ["cat a", "cat b", "cat c", "cat d", "cat e", "cat f", "cat g", "cat h", "job a", "job b"]
    near = make_segmenter(peaked_attention({6}), window_turns=3)
    assert near.boundaries(texts) == ([8], "attention+similarity")
    far = make_segmenter(peaked_attention({2}), window_turns=3)
    assert far.boundaries(texts) == ([], "single")


def test_short_buffers_use_similarity_alone():
    seg = make_segmenter()
    assert seg.boundaries(["cat", "job", "job"]) == ([1], "similarity")
    assert seg.boundaries(["cat"]) == ([], "single")


def test_buffer_cuts_on_overflow_and_keeps_the_tail():
    seg = make_segmenter(peaked_attention({4}), buffer_tokens=40)
    state = SensoryBufferState(user_id="u")
    texts = ["cat one", "cat two", "cat three", "cat four", "job one", "job two", "job three", "job four"]
    emitted = []
    for i, text in enumerate(texts):
        out, state = sg.segment(state, compressed_turn("u", i, text, encoder_tokens=5), seg)
        emitted.extend(out)
    assert emitted == []  # 8 × 5 tokens fit in 40
    out, state = sg.segment(state, compressed_turn("u", 8, "job five", encoder_tokens=5), seg)
    assert len(out) == 1
    assert [t.compressed_text for t in out[0].turns] == texts[:4]
    assert out[0].boundary == "attention+similarity"
    assert [t.compressed_text for t in state.turns] == ["job one", "job two", "job three", "job four", "job five"]
    assert state.encoder_tokens == 25


def test_any_role_sequence_and_redelivery():
    seg = make_segmenter(buffer_tokens=16)
    state = SensoryBufferState(user_id="u")
    roles = ["user", "user", "tool", "assistant", "Caroline", "Melanie", "Melanie"]
    out_all = []
    turns = [
        compressed_turn("u", i, f"cat {i}" if i < 4 else f"trip {i}", role=r, encoder_tokens=4)
        for i, r in enumerate(roles)
    ]
    for t in turns:
        out, state = sg.segment(state, t, seg)
        out_all.extend(out)
        again, state2 = sg.segment(state, t, seg)  # redelivered turn: ignored
        assert again == [] and state2 == state
    out, state = sg.flush(state, seg)
    out_all.extend(out)
    assert state.turns == []
    seen = [t.turn_id for s in out_all for t in s.turns]
    assert seen == [t.turn_id for t in turns]  # every turn once, in order: no loss, no duplicate


def test_oversize_turn_is_its_own_segment():
    seg = make_segmenter(buffer_tokens=16)
    state = SensoryBufferState(user_id="u")
    out, state = sg.segment(state, compressed_turn("u", 0, "cat small", encoder_tokens=4), seg)
    out, state = sg.segment(state, compressed_turn("u", 1, "job huge", encoder_tokens=50), seg)
    assert [s.boundary for s in out] == ["single", "oversize"]
    assert state.turns == []


def test_wrong_user_is_rejected():
    seg = make_segmenter()
    with pytest.raises(ValueError, match="added to the buffer"):
        sg.segment(SensoryBufferState(user_id="a"), compressed_turn("b", 0, "cat"), seg)


def test_segment_ids_are_deterministic():
    turns = [compressed_turn("u", i, "cat") for i in range(3)]
    assert sg.make_segment("u", turns, "flush").segment_id == sg.make_segment("u", turns, "flush").segment_id
    assert sg.make_segment("u", turns[:2], "flush").segment_id != sg.make_segment("u", turns, "flush").segment_id


@pytest.mark.slow
def test_real_encoder_finds_the_topic_shift():
    from streams.encoder import load_encoder
    from streams.settings import EmbeddingSettings

    enc = load_encoder(EmbeddingSettings())
    seg = sg.Segmenter(SegmentationSettings(), enc.token_attention, enc.embed)
    texts = [
        "Alex: My cat Pixel is fourteen and has a kidney problem.",
        "Assistant: Older cats often need a special renal diet.",
        "Alex: Pixel eats renal food and sees the vet every three months.",
        "Assistant: Regular vet checks are wise for a senior cat.",
        "Alex: I signed up for the Rotterdam half marathon in October.",
        "Assistant: How many kilometres do you run each week?",
        "Alex: About fifteen kilometres, three short runs before work.",
        "Assistant: Add ten percent per week to build up to the race distance.",
    ]
    cuts, kind = seg.boundaries(texts)
    assert cuts, "a cat → running shift must produce a boundary"
    assert any(abs(c - 4) <= 1 for c in cuts), (cuts, kind)
    att, spans = enc.token_attention(texts, None)
    assert att.shape[0] == att.shape[1] and len(spans) == len(texts)


@pytest.mark.slow
def test_first_layer_fast_path_equals_the_eager_model():
    import torch

    from streams.encoder import load_encoder
    from streams.settings import EmbeddingSettings

    enc = load_encoder(EmbeddingSettings())
    texts = ["Alex: my cat Pixel is fourteen.", "Sam: the half marathon is in October!", "Alex: ok"] * 12
    fast, spans = enc.token_attention(texts, [0])
    ids = [enc.tokenizer.cls_token_id]
    for t in texts:
        ids += enc.tokenizer.encode(t, add_special_tokens=False)
    ids.append(enc.tokenizer.sep_token_id)
    with torch.inference_mode():
        out = enc._attention_model(1)(input_ids=torch.tensor([ids]), output_attentions=True)
    eager = out.attentions[0].mean(dim=1)[0].numpy()
    assert fast.shape == eager.shape == (len(ids), len(ids))
    assert np.abs(fast - eager).max() < 1e-5
    assert spans[0] == (1, 1 + len(enc.tokenizer.encode(texts[0], add_special_tokens=False)))


def test_a_turn_reproduced_after_it_left_the_buffer_is_dropped():
    seg = make_segmenter(buffer_tokens=16)
    state = SensoryBufferState(user_id="u")
    emitted = []
    turns = [compressed_turn("u", i, f"topic{i // 2} words here", encoder_tokens=6) for i in range(6)]
    for t in turns:
        out, state = sg.segment(state, t, seg)
        emitted.extend(out)
    assert emitted, "the buffer must have cut at least once"
    before = state
    for t in turns:  # the whole session again, at new offsets: nothing new enters
        out, state = sg.segment(state, t, seg)
        assert out == []
    assert state == before
    # a later turn of the session still goes in, and another session is independent
    out, state = sg.segment(state, compressed_turn("u", 6, "topic3 words here", encoder_tokens=6), seg)
    assert state.last_seq == {"s1": 6}
    _, state = sg.segment(state, compressed_turn("u", 0, "other session", session="s2"), seg)
    assert state.last_seq == {"s1": 6, "s2": 0}
