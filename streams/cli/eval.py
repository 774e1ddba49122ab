"""``lightmem eval``: LightMem Streams against raw-turn baselines on LoCoMo / LongMemEval (evidence recall, cost)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from streams.cli.common import DATA_DIR_OPT, console, err, fail, load_settings

app = typer.Typer()


class Benchmark(StrEnum):
    locomo = "locomo"
    longmemeval = "longmemeval"


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{name} takes comma-separated integers, e.g. 5,10,20, not {text!r}")


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{name} takes comma-separated numbers, e.g. 0.6,0.7, not {text!r}")


@app.command("eval")
def eval_(
    benchmark: Annotated[Benchmark, typer.Argument(help="which benchmark the data file holds")],
    data: Annotated[
        Path, typer.Option(help="benchmark file (locomo10*.json / longmemeval_*.json)", exists=True, dir_okay=False)
    ],
    limit: Annotated[
        int | None, typer.Option(help="only the first N conversations (LoCoMo) / questions (LongMemEval)")
    ] = None,
    k: Annotated[str, typer.Option("--k", help="comma-separated cut-offs k for recall@k")] = "5,10,20,60",
    out: Annotated[
        Path | None,
        typer.Option(
            help="output directory (results.json, report.md, PNGs, checkpoint); rerun with the same one to resume "
            "(default: <data dir>/eval/<benchmark>-<timestamp>)"
        ),
    ] = None,
    rates: Annotated[
        str | None,
        typer.Option(
            help="compression rates of the LightMem grid, comma-separated (default: LIGHTMEM_COMPRESSION__RATE)"
        ),
    ] = None,
    thresholds: Annotated[
        str | None,
        typer.Option(
            help="STM thresholds (tokens) of the LightMem grid, comma-separated "
            "(default: LIGHTMEM_STM__THRESHOLD_TOKENS)"
        ),
    ] = None,
    systems: Annotated[
        str, typer.Option(help="systems to run: fulltext, naiverag, bm25, lightmem")
    ] = "fulltext,naiverag,bm25,lightmem",
    judge: Annotated[
        bool,
        typer.Option(
            help="also answer from the retrieved items and let the LLM judge them (needs LIGHTMEM_LLM__BASE_URL)"
        ),
    ] = False,
    judge_k: Annotated[int, typer.Option(help="items handed to the answerer with --judge (FullText: everything)")] = 10,
    judge_systems: Annotated[
        str | None, typer.Option(help="systems judged with --judge (default: all of --systems)")
    ] = None,
    chunk_turns: Annotated[int, typer.Option(help="turns per add_turns call while ingesting")] = 64,
    compact: Annotated[
        bool,
        typer.Option(help="also run the sleep-time update after ingest and score LightMem again (recall after)"),
    ] = False,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="skip the PNG plots")] = False,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Evaluate LightMem Streams, FullText, NaiveRAG and BM25 by evidence recall@k, with cost per stage.

    Every system uses the same k and the memory's own encoder; LightMem runs the real embedded pipeline into a
    store inside the output directory (your own store is never touched). Works offline (extractive mode: no LLM
    calls) and with any OpenAI-compatible endpoint (calls and tokens counted).
    """
    from streams.eval.judge import JudgeUnavailable
    from streams.eval.report import summary_table
    from streams.eval.run import EvalError, EvalOptions, default_out_dir, run_eval

    settings = load_settings(data_dir)
    system_list = [s.strip() for s in systems.split(",") if s.strip()]
    opts = EvalOptions(
        benchmark=benchmark.value,
        data=data,
        out=out or default_out_dir(settings, benchmark.value),
        ks=sorted(set(_ints(k, "--k"))),
        limit=limit,
        systems=system_list,
        rates=_floats(rates, "--rates") if rates else None,
        thresholds=_ints(thresholds, "--thresholds") if thresholds else None,
        judge=judge,
        judge_k=judge_k,
        judge_systems=[s.strip() for s in judge_systems.split(",") if s.strip()] if judge_systems else None,
        chunk_turns=chunk_turns,
        compact=compact,
        plots=not no_plots,
    )
    err.print(f"[bold]lightmem eval {opts.benchmark}[/] → {opts.out}")
    try:
        results = run_eval(opts, settings, console=err)
    except (EvalError, JudgeUnavailable) as e:
        fail(str(e))
    console.print(f"\n## {opts.benchmark}: evidence recall (ordinary questions)\n")
    console.print(summary_table(results), markup=False, highlight=False, soft_wrap=True)
    console.print(
        f"\nresults: {opts.out / 'results.json'}  report: {opts.out / 'report.md'}  plots: "
        + ", ".join(results.get("plots", [])),
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
