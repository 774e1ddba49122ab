"""Prometheus metrics: the cost ledger, dead letters and store writes feed the exported series."""

from __future__ import annotations

from prometheus_client import REGISTRY

from schemas import StageCost
from streams import metrics
from streams.cost import CostLedger
from streams.dlq import DeadLetterLog, dead_letter


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_cost_ledger_feeds_stage_counters_once():
    calls0 = _value("lightmem_llm_calls_total", stage="extraction")
    tok0 = _value("lightmem_llm_tokens_total", stage="extraction", direction="input")
    n0 = _value("lightmem_stage_seconds_count", stage="extraction")
    ledger = CostLedger()
    ledger.record(StageCost(stage="extraction", calls=2, input_tokens=300, output_tokens=40, seconds=1.5, items=2))
    other = CostLedger()
    other.merge(ledger)  # merging totals must not count the same work twice
    assert _value("lightmem_llm_calls_total", stage="extraction") == calls0 + 2
    assert _value("lightmem_llm_tokens_total", stage="extraction", direction="input") == tok0 + 300
    assert _value("lightmem_stage_seconds_count", stage="extraction") == n0 + 1
    assert other.totals()["extraction"].calls == 2


def test_dead_letters_counted_by_stage(tmp_path):
    before = _value("lightmem_dead_letters_total", stage="extract", error_type="LLMError")
    DeadLetterLog(tmp_path / "dl.jsonl").send(dead_letter("extract", "bad json", "LLMError", "{}", "u1"))
    assert _value("lightmem_dead_letters_total", stage="extract", error_type="LLMError") == before + 1


def test_consumer_lag_and_render():
    metrics.set_consumer_lag("g", "lightmem.turns.raw", 3, 17)
    body, ctype = metrics.render()
    assert ctype.startswith("text/plain")
    assert b'lightmem_consumer_lag{group="g",partition="3",topic="lightmem.turns.raw"} 17.0' in body
