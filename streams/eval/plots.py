"""PNG plots of an evaluation's results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from streams.eval.metrics import OVERALL
from streams.eval.report import reference_k

__all__ = ["write_plots"]


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def recall_curves(results: Mapping[str, Any], path: Path) -> Path:
    plt = _plt()
    ks = results["config"]["ks"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in (
        (axes[0], "evidence_recall", "evidence recall@k"),
        (axes[1], "recall_all", "recall_all@k (all evidence covered)"),
    ):
        for s in results["systems"]:
            m = s["metrics"].get(OVERALL, {})
            ys = [m.get(f"{metric}@{k}") for k in ks]
            ys = [float("nan") if y is None else y for y in ys]
            style = "--" if s["system"] == "fulltext" else "-"
            ax.plot(ks, ys, style, marker="o", label=s["label"])
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("k (items retrieved)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{results['benchmark']}: ordinary questions (n={_n(results)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _n(results: Mapping[str, Any]) -> int:
    s = results["systems"][0] if results["systems"] else {}
    return int(s.get("metrics", {}).get(OVERALL, {}).get("n_with_evidence", 0))


def cost_bars(results: Mapping[str, Any], path: Path) -> Path:
    plt = _plt()
    systems = results["systems"]
    stages = list(dict.fromkeys(st for s in systems for st in s["cost"]))
    labels = [s["label"].replace(" (", "\n(") for s in systems]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    bottom = [0.0] * len(systems)
    for st in stages:
        vals = [s["cost"].get(st, {}).get("seconds", 0.0) for s in systems]
        axes[0].bar(labels, vals, bottom=bottom, label=st)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    axes[0].set_ylabel("seconds (summed over users)")
    axes[0].set_title("time per stage")
    axes[0].legend(fontsize=8)
    axes[0].tick_params(axis="x", labelsize=7)
    llm_stages = [st for st in stages if any(s["cost"].get(st, {}).get("calls", 0) for s in systems)]
    if llm_stages:
        width = 0.8 / (2 * len(llm_stages))
        xs = range(len(systems))
        for i, st in enumerate(llm_stages):
            for j, (field, hatch) in enumerate((("input_tokens", None), ("output_tokens", "//"))):
                vals = [s["cost"].get(st, {}).get(field, 0) for s in systems]
                off = (2 * i + j) * width - 0.4 + width / 2
                axes[1].bar([x + off for x in xs], vals, width, hatch=hatch, label=f"{st} {field.split('_')[0]}")
        axes[1].set_xticks(list(xs))
        axes[1].set_xticklabels(labels, fontsize=7)
        axes[1].set_ylabel("LLM tokens")
        axes[1].legend(fontsize=8)
        calls = sum(s["llm"]["calls"] for s in systems)
        axes[1].set_title(f"LLM tokens per stage ({calls} calls)")
    else:
        axes[1].axis("off")
        axes[1].text(0.5, 0.5, "no LLM calls\n(offline extractive mode)", ha="center", va="center", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tradeoff(results: Mapping[str, Any], path: Path) -> Path:
    plt = _plt()
    kref = reference_k(results["config"]["ks"])
    cells = [s for s in results["systems"] if s["system"] == "lightmem" and not s["config"].endswith("+sleep")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, xkey, xlabel in (
        (axes[0], "ratio", "compression ratio achieved (compressed / raw tokens)"),
        (axes[1], "tokens", f"tokens read per question (tokens@{kref})"),
    ):
        for s in cells:
            m = s["metrics"].get(OVERALL, {})
            y = m.get(f"evidence_recall@{kref}")
            x = s["compression"]["ratio"] if xkey == "ratio" else m.get(f"tokens@{kref}")
            if x is None or y is None:
                continue
            ax.scatter([x], [y], s=40)
            ax.annotate(
                f"r={s['rate']:g}, t={s['threshold']}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        for s in results["systems"]:
            if s["system"] in ("naiverag", "bm25") and xkey == "tokens":
                m = s["metrics"].get(OVERALL, {})
                if m.get(f"evidence_recall@{kref}") is not None:
                    ax.scatter([m[f"tokens@{kref}"]], [m[f"evidence_recall@{kref}"]], marker="x", color="gray")
                    ax.annotate(
                        s["label"],
                        (m[f"tokens@{kref}"], m[f"evidence_recall@{kref}"]),
                        fontsize=7,
                        color="gray",
                        xytext=(3, -9),
                        textcoords="offset points",
                    )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"evidence recall@{kref}")
        ax.grid(alpha=0.3)
    fig.suptitle("LightMem Streams: compression rate × STM threshold")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(results: Mapping[str, Any], out: Path) -> list[Path]:
    """recall_at_k.png, cost_per_stage.png, and tradeoff.png when more than one LightMem cell ran."""
    paths = [recall_curves(results, out / "recall_at_k.png"), cost_bars(results, out / "cost_per_stage.png")]
    if sum(1 for s in results["systems"] if s["system"] == "lightmem" and not s["config"].endswith("+sleep")) > 1:
        paths.append(tradeoff(results, out / "tradeoff.png"))
    return paths
