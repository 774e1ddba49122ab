"""Markdown report of an evaluation's results (the dict ``streams.eval.run.run_eval`` returns / writes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from streams.eval.metrics import ABSTENTION, ADVERSARIAL, ALL, OVERALL

__all__ = ["cost_rows", "reference_k", "render_markdown", "summary_table"]


def reference_k(ks: Sequence[int]) -> int:
    """The k used where one k is shown (per-category table, trade-off plot): 10 when run, else the largest."""
    return 10 if 10 in ks else max(ks)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _tokens(v: Any) -> str:
    return "–" if v is None else f"{v:,.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _metric_table(systems: Sequence[Mapping[str, Any]], ks: Sequence[int], metric: str, group: str = OVERALL) -> str:
    kref = reference_k(ks)
    header = ["system", *[f"{metric}@{k}" for k in ks], f"tokens@{kref}"]
    rows = []
    for s in systems:
        m = s["metrics"].get(group, {})
        rows.append([s["label"], *[_fmt(m.get(f"{metric}@{k}")) for k in ks], _tokens(m.get(f"tokens@{kref}"))])
    return _table(header, rows)


def summary_table(results: Mapping[str, Any]) -> str:
    """The headline table: every system's evidence recall@k over ordinary questions, plus tokens, time, LLM calls."""
    ks = results["config"]["ks"]
    kref = reference_k(ks)
    header = [
        "system",
        *[f"recall@{k}" for k in ks],
        f"recall_all@{kref}",
        f"nDCG@{kref}",
        f"tokens@{kref}",
        "wall s",
        "LLM calls",
    ]
    rows = []
    for s in results["systems"]:
        m = s["metrics"].get(OVERALL, {})
        rows.append(
            [
                s["label"],
                *[_fmt(m.get(f"evidence_recall@{k}")) for k in ks],
                _fmt(m.get(f"recall_all@{kref}")),
                _fmt(m.get(f"ndcg@{kref}")),
                _tokens(m.get(f"tokens@{kref}")),
                f"{s['wall_s']['total']:.1f}",
                str(s["llm"]["calls"]),
            ]
        )
    return _table(header, rows)


def _groups(systems: Sequence[Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for s in systems:
        for g in s["metrics"]:
            if g not in names:
                names.append(g)
    cats = sorted(g for g in names if g.startswith("cat:"))
    return cats + [g for g in (OVERALL, ABSTENTION, ADVERSARIAL, ALL) if g in names]


def _per_group_table(
    systems: Sequence[Mapping[str, Any]], metric: str, metrics_key: str = "metrics", count: str = "n_with_evidence"
) -> str:
    groups = _groups(systems)
    first = systems[0][metrics_key] if systems else {}
    header = ["system", *[f"{g.removeprefix('cat:')} (n={first.get(g, {}).get(count, 0)})" for g in groups]]
    rows = [[s["label"], *[_fmt(s[metrics_key].get(g, {}).get(metric)) for g in groups]] for s in systems]
    return _table(header, rows)


def cost_rows(system: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for stage, c in system["cost"].items():
        rows.append(
            [
                system["label"],
                stage,
                str(c["calls"]),
                f"{c['input_tokens']:,}",
                f"{c['output_tokens']:,}",
                f"{c['seconds']:.2f}",
                str(c["items"]),
            ]
        )
    return rows


def render_markdown(results: Mapping[str, Any]) -> str:
    ks = results["config"]["ks"]
    kref = reference_k(ks)
    systems = results["systems"]
    ds = results["dataset"]
    v = results["versions"]
    lm = [s for s in systems if s["system"] == "lightmem"]
    parts = [
        f"# LightMem Streams evaluation: {results['benchmark']}",
        "",
        f"Data `{results['data']['path']}` (sha256 `{results['data']['sha256'][:16]}…`): {ds['users']} users, "
        f"{ds['turns']:,} turns ({ds['history_tokens']:,} tokens), {ds['questions']} questions. "
        f"Commit `{(v.get('git_commit') or 'unknown')[:12]}`{' (dirty)' if v.get('git_dirty') else ''}; "
        f"embedding `{results['models'].get('embedding_model_loaded') or results['models']['embedding_model']}`, "
        f"compressor `{results['models'].get('compressor_loaded') or results['models']['compressor']}`, "
        f"extractor `{results['models'].get('extractor_loaded') or results['models']['extractor']}`, "
        f"pipeline `{results['models']['pipeline_version']}`.",
        "",
        "Evidence recall: the share of a question's gold evidence turns covered by the source turns of the top-k "
        "retrieved items; `overall` = ordinary questions (abstention and adversarial questions are reported "
        "apart and have no evidence recall when they have no evidence). FullText hands over the whole history "
        "for every k (recall ceiling; tokens = the history). tokens@k = cl100k tokens an answerer would read.",
        "",
        "## Overall",
        "",
        summary_table(results),
        "",
        "### recall_all@k (every evidence turn covered)",
        "",
        _metric_table(systems, ks, "recall_all"),
        "",
        "### nDCG@k (coverage nDCG)",
        "",
        _metric_table(systems, ks, "ndcg"),
        "",
        f"## Evidence recall@{kref} per category",
        "",
        _per_group_table(systems, f"evidence_recall@{kref}"),
        "",
    ]
    if results["benchmark"] == "longmemeval":
        parts += [
            f"## Session recall@{kref} per question type",
            "",
            _per_group_table(systems, f"session_recall@{kref}", count="n"),
            "",
        ]
    if lm:
        parts += [
            "## LightMem Streams: compression and memories",
            "",
            _table(
                [
                    "config",
                    "rate",
                    "STM threshold",
                    "raw tokens",
                    "compressed tokens",
                    "ratio",
                    "memories",
                    "dead letters",
                    f"recall@{kref}",
                    f"recall@{kref} facts-only",
                    f"recall@{kref} batch credit",
                ],
                [
                    [
                        s["config"],
                        f"{s['rate']:g}",
                        str(s["threshold"]),
                        f"{s['compression']['raw_tokens']:,}",
                        f"{s['compression']['compressed_tokens']:,}",
                        _fmt(s["compression"]["ratio"]),
                        str(s["memories"]),
                        str(s["dead_letters"]),
                        _fmt(s["metrics"].get(OVERALL, {}).get(f"evidence_recall@{kref}")),
                        _fmt(s["metrics_facts_only"].get(OVERALL, {}).get(f"evidence_recall@{kref}")),
                        _fmt((s.get("metrics_batch_credit") or {}).get(OVERALL, {}).get(f"evidence_recall@{kref}")),
                    ]
                    for s in lm
                ],
            ),
            "",
            "Every recall in this report credits a memory with the turns it states: a fact with its cited source "
            "turns, a summary with the turns its sentences cite. *facts-only* scores the same ranking with summaries "
            "credited with no turn (a lower bound); *batch credit* credits each summary with every turn of its STM "
            "batch that the batch's memories cite (generous: a summary then covers turns it does not state; for "
            "comparison with older reports only).",
            "",
        ]
    parts += [
        "## Cost per stage",
        "",
        _table(
            ["system", "stage", "LLM calls", "input tokens", "output tokens", "seconds", "items"],
            [r for s in systems for r in cost_rows(s)],
            "llrrrrr",
        ),
        "",
        _table(
            ["system", "ingest s", "query s", "total s", "LLM calls", "LLM input tokens", "LLM output tokens"],
            [
                [
                    s["label"],
                    f"{s['wall_s']['ingest']:.1f}",
                    f"{s['wall_s']['query']:.1f}",
                    f"{s['wall_s']['total']:.1f}",
                    str(s["llm"]["calls"]),
                    f"{s['llm']['input_tokens']:,}",
                    f"{s['llm']['output_tokens']:,}",
                ]
                for s in systems
            ],
        ),
        "",
    ]
    judged = [s for s in systems if s.get("judge")]
    if judged:
        groups = [g for g in _groups(systems) if any(g in s["judge"]["by_group"] for s in judged)]
        parts += [
            f"## LLM-judge accuracy (answers from the top {judged[0]['judge']['k']} items; model "
            f"`{judged[0]['judge']['model']}`) — beside recall, not instead of it",
            "",
            _table(
                ["system", *[g.removeprefix("cat:") for g in groups], "ungraded", "judge calls"],
                [
                    [
                        s["label"],
                        *[_fmt(s["judge"]["by_group"].get(g, {}).get("accuracy")) for g in groups],
                        str(s["judge"]["by_group"].get(ALL, {}).get("ungraded", 0)),
                        str(s["judge"]["cost"]["calls"]),
                    ]
                    for s in judged
                ],
            ),
            "",
        ]
    run = results["run"]
    parts += [
        f"Run: {run['wall_s']:.1f} s wall (models loaded in {run['model_load_s']:.1f} s); "
        f"{run['evaluated_units']} units evaluated, {run['reused_units']} reused from the checkpoint, "
        f"{run['ingested_users']} users ingested. Python {v['python']}, torch {v.get('torch')}.",
        "",
    ]
    return "\n".join(parts)
