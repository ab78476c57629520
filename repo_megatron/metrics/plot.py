"""``repo-megatron plot RUN_DIR``: PNG curves of a run's metrics (from ``metrics.jsonl``) and of
its hard prompts (from ``ledger.jsonl``: prompts whose gate fired, solved on-policy, rescued)."""

from __future__ import annotations

import argparse
import os
import sys
from bisect import bisect_right

from ..algorithm.provenance import PROVENANCES
from .ledger import LEDGER_FILE, read_ledger
from .writer import read_rows

# Panel title -> metric keys drawn on it (missing keys are skipped; a panel with none is not drawn)
PANELS = {
    "reward": ["rollout/reward_onpolicy_mean", "rollout/reward_injected_mean",
               "rollout/reward_rephrase_mean"],
    "hard-set solve rate": ["eval/solve_rate"],
    "gate / injection rate": ["rollout/gate_rate", "rollout/injection_rate",
                              "rollout/rephrase_verified_rate"],
    "KL": ["train/kl", "train/ppo_kl", "train/logprob_mismatch_mean"],
    "entropy": ["train/entropy"],
    "gradient norm": ["train/grad_norm"],
    "clip fraction": ["train/clipfrac_low", "train/clipfrac_high", "train/clipfrac_dual"],
    "response length": ["rollout/response_length_mean", "rollout/injected_length_mean"],
    "per-token NLL under q, by provenance": [f"train/{kind}/nll" for kind in PROVENANCES],
    "mean advantage by provenance": [f"train/{kind}/advantage" for kind in PROVENANCES],
    "rephrase faithfulness (4-gram overlap)": ["rollout/rephrase_overlap_mean",
                                               "rollout/rephrase_overlap_max"],
}
LEDGER_PANEL = "hard prompts (ledger, cumulative)"


def metric_curves(rows: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{panel title: {label: [(step, value)]}}`` of the :data:`PANELS` that have data, plus
    the on-policy reward of each source of a mixture (``rollout/<source>/...``)."""
    per_source = sorted({k for r in rows for k in r
                         if k.count("/") == 2 and k.startswith("rollout/")
                         and k.endswith("/reward_onpolicy_mean")})
    curves = {}
    for title, keys in {**PANELS, "on-policy reward per source": per_source}.items():
        lines = {key.split("/", 1)[-1].removesuffix("/reward_onpolicy_mean"):
                 [(r["step"], r[key]) for r in rows if r.get(key) is not None] for key in keys}
        lines = {label: pts for label, pts in lines.items() if pts}
        if lines:
            curves[title] = lines
    return curves


def ledger_curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Cumulative prompts gated, solved on-policy and rescued, at every step of the ledger."""
    steps = sorted({h["step"] for r in records for h in r["history"]})
    curves = {}
    for label, key in (("gated", "first_gate_step"), ("solved on-policy", "first_solved_step"),
                       ("rescued", "rescued_step")):
        firsts = sorted(r[key] for r in records if r[key] is not None)
        curves[label] = [(step, float(bisect_right(firsts, step))) for step in steps]
    return curves


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Draw the panels that have data (and the ledger's rescued prompts); returns the PNG path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl rows to plot")
    panels = metric_curves(rows)
    records = read_ledger(os.path.join(run_dir, LEDGER_FILE))
    if records:
        panels[LEDGER_PANEL] = ledger_curves(records)
    cols = 3
    nrows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.2 * nrows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels.items()):
        for label, pts in lines.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out = out or os.path.join(run_dir, "metrics.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="A run directory (holds metrics.jsonl)")
    parser.add_argument("--out", help="PNG path (default RUN_DIR/metrics.png)")


def run(args: argparse.Namespace) -> int:
    try:
        path = plot_run(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"repo-megatron plot: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
