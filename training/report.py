"""The evaluation report: the quality table and the plots, both read from ``metrics.json``'s dict.

``python -m training run`` writes ``metrics.json`` and, next to it, ``evaluation.png``; the
notebooks call the same functions, so a plot and a table never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Every model of the report, in table order; the two-stage model last.
MODELS = ("popularity", "svd", "mf", "ease", "item_knn_recent", "sasrec", "two_stage")
LABELS = {
    "popularity": "popularity",
    "svd": "Surprise SVD",
    "mf": "MF (BPR)",
    "ease": "EASE",
    "item_knn_recent": "recent-item kNN",
    "sasrec": "SASRec-style",
    "two_stage": "two-stage",
}
COLUMNS = ("hr@10", "ndcg@10", "recall@100", "coverage@10")
# by_gap compares the two-stage model with each candidate source alone.
GAP_LABELS = {"two_stage": "two-stage", "mf": "MF alone", "item_neighbours": "item neighbours alone",
              "sequence": "sequence model alone"}
GAP_COLOURS = {"two_stage": "tab:orange", "mf": "tab:blue", "item_neighbours": "tab:green", "sequence": "tab:purple"}
REPLAY_LABELS = {
    "two_stage_fresh": "two-stage, fresh history",
    "two_stage_frozen": "two-stage, frozen history",
    "two_stage_fresh_refreshed_items": "two-stage, fresh history + item stats",
    "item_knn_recent_fresh": "recent-item kNN, fresh history",
    "sasrec_fresh": "SASRec-style, fresh history",
    "popularity": "popularity (frozen)",
    "ease": "EASE (frozen)",
}
PLOT_FILE = "evaluation.png"
# by_gap's two-stage minus the bucket's best source alone, paired over its users.
MINUS_BEST_SOURCE = "two_stage_minus_best_source"
_Z95 = 1.96


def reported_models(metrics: Mapping[str, Any]) -> list[str]:
    """The models with test metrics in ``metrics`` (skipped baselines carry only a reason)."""
    return [name for name in MODELS if isinstance(metrics.get(name), dict) and "ndcg@10" in metrics[name]]


def format_table(metrics: Mapping[str, Any]) -> str:
    """The side-by-side test table (mean ± standard error) printed at the end of a run."""
    rows = [("model", *(c.upper().replace("@", "@") for c in COLUMNS))]
    for name in reported_models(metrics):
        block = metrics[name]
        cells = [
            f"{block[c]:.4f} ± {block[c + '_se']:.4f}" if c + "_se" in block else f"{block[c]:.4f}" for c in COLUMNS
        ]
        rows.append((LABELS[name], *cells))
    for name in MODELS:
        skipped = metrics.get(name, {}).get("skipped") if isinstance(metrics.get(name), dict) else None
        if skipped:
            rows.append((LABELS[name], f"skipped: {skipped}", "", "", ""))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    # A model run cheaper than in full (the report's budget, training/report_budget.py) says how.
    notes = [f"{LABELS[name]}: {metrics[name]['note']}" for name in reported_models(metrics) if "note" in metrics[name]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], *notes])


def format_stage_one(metrics: Mapping[str, Any]) -> str:
    """One line per candidate source: its own Recall@100 on test, and the merged list's."""
    stage = metrics.get("stage1", {}).get("recall@100", {})
    return "\n".join(f"  {name:<16} Recall@100 {value:.4f}" for name, value in stage.items())


def format_ablations(metrics: Mapping[str, Any]) -> str:
    """Each ablation's test NDCG@10 and its difference from the full model (or why none ran)."""
    ablations = metrics.get("ablations", {})
    if "skipped" in ablations:
        return f"  skipped: {ablations['skipped']}"
    full = metrics["two_stage"]["ndcg@10"]
    lines = []
    for name, block in ablations.items():
        lines.append(f"  {name:<28} NDCG@10 {block['ndcg@10']:.4f}  ({block['ndcg@10'] - full:+.4f})")
    return "\n".join(lines)


def plot_ndcg(metrics: Mapping[str, Any], ax: Any) -> None:
    """NDCG@10 per model on test, with 95% error bars (1.96 standard errors)."""
    names = reported_models(metrics)
    values = [metrics[n]["ndcg@10"] for n in names]
    errors = [_Z95 * metrics[n].get("ndcg@10_se", 0.0) for n in names]
    colours = ["tab:orange" if n == "two_stage" else "tab:blue" for n in names]
    ax.barh([LABELS[n] for n in names], values, xerr=errors, color=colours, capsize=3)
    ax.set_xlabel("NDCG@10 (test, full ranking; bars: 95% CI)")
    ax.set_title(f"{metrics.get('dataset', '')}: {metrics.get('n_test_users', '?')} test users")


def plot_recall_curves(metrics: Mapping[str, Any], ax: Any) -> None:
    """Recall@K of each candidate source and of the merged list (test)."""
    for name, curve in metrics.get("stage1", {}).get("recall_curves", {}).items():
        ks = sorted(int(k) for k in curve)
        ax.plot(
            ks,
            [curve[str(k)] if str(k) in curve else curve[k] for k in ks],
            marker="o",
            label=name,
            linewidth=2.5 if name == "merged" else 1.5,
        )
    ax.set_xscale("log")
    ax.set_xlabel("K (candidates)")
    ax.set_ylabel("Recall@K (test)")
    ax.set_title("Stage 1: candidate sources")
    ax.legend()
    ax.grid(True, alpha=0.3)


def plot_feature_importance(metrics: Mapping[str, Any], ax: Any, top: int = 15) -> None:
    importance = metrics.get("ranker", {}).get("feature_importance", {})
    best = sorted(importance.items(), key=lambda kv: kv[1])[-top:]
    ax.barh([k for k, _ in best], [v for _, v in best], color="tab:green")
    ax.set_xlabel("total gain")
    ax.set_title("Ranker: feature importance")


def plot_by_gap(metrics: Mapping[str, Any], ax: Any) -> None:
    """NDCG@10 of the two-stage model and of each candidate source alone, by the real gap between a
    user's last interaction and the held-out one."""
    buckets = metrics.get("by_gap", {})
    labels = [f"{name}\n({block['users']} users)" for name, block in buckets.items()]
    models = [m for m in next(iter(buckets.values()), {}) if m not in ("users", MINUS_BEST_SOURCE)]
    width = 0.8 / max(1, len(models))
    for k, model in enumerate(models):
        values = [block[model]["ndcg@10"] or 0.0 for block in buckets.values()]
        errors = [_Z95 * (block[model]["ndcg@10_se"] or 0.0) for block in buckets.values()]
        ax.bar([x + k * width for x in range(len(labels))], values, width, yerr=errors, capsize=2,
               label=GAP_LABELS.get(model, model), color=GAP_COLOURS.get(model))
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(labels))], labels, fontsize=8)
    ax.set_ylabel("NDCG@10 (test)")
    ax.set_title("By the real gap since the user's last interaction")
    ax.legend(fontsize=8)


def plot_replay(metrics: Mapping[str, Any], ax: Any) -> None:
    """The replay: NDCG@10 by week since training, fresh history against frozen, and the baselines."""
    weeks = (metrics.get("replay") or {}).get("by_week", [])
    if not weeks:
        ax.set_axis_off()
        ax.set_title("Replay: not run (--no-replay)")
        return
    labels = [w["weeks"] for w in weeks]
    for model in metrics["replay"]["models"]:
        ax.plot(labels, [w[model] for w in weeks], marker="o", label=REPLAY_LABELS.get(model, model),
                linewidth=2.5 if model.startswith("two_stage") else 1.2,
                linestyle="--" if model.endswith("frozen") else "-")
    ax.set_xlabel("weeks since training")
    ax.set_ylabel("NDCG@10 of the next interaction")
    ax.set_title(f"Replay: trained up to {metrics['replay'].get('cutoff', '?')[:10]}, served the weeks after")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)


def write_plots(metrics: Mapping[str, Any], path: Path) -> Path:
    """The evaluation figure as a PNG: NDCG@10 per model, the sources' Recall@K, NDCG@10 by the real
    gap since the last interaction, and the replay by week since training."""
    # A bare Figure draws without pyplot, so no display backend is touched (notebooks keep theirs).
    from matplotlib.figure import Figure

    figure = Figure(figsize=(14, 9.6))
    (top_left, top_right), (bottom_left, bottom_right) = figure.subplots(2, 2)
    plot_ndcg(metrics, top_left)
    plot_recall_curves(metrics, top_right)
    plot_by_gap(metrics, bottom_left)
    plot_replay(metrics, bottom_right)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def format_by_gap(metrics: Mapping[str, Any]) -> str:
    """NDCG@10 per real-gap bucket: the two-stage model and each source alone."""
    lines = []
    for name, block in metrics.get("by_gap", {}).items():
        cells = "  ".join(
            f"{GAP_LABELS.get(m, m)} {v['ndcg@10']:.4f}"
            for m, v in block.items()
            if m not in ("users", MINUS_BEST_SOURCE) and v["ndcg@10"] is not None
        )
        diff = block.get(MINUS_BEST_SOURCE)
        if diff:
            cells += f"  (minus {GAP_LABELS.get(diff['source'], diff['source'])}: {diff['ndcg@10']:+.4f} ± {diff['ndcg@10_se']:.4f})"
        lines.append(f"  {name:<16} ({block['users']:>5} users)  {cells}")
    later = metrics.get("two_stage_asked_90_days_later")
    if later:
        lines.append(f"  every request asked 90 days after its interaction: two-stage NDCG@10 {later['ndcg@10']:.4f}")
    return "\n".join(lines)


def format_replay(metrics: Mapping[str, Any]) -> str:
    """The replay's summary: each model over every replayed event, and fresh minus frozen history."""
    replay = metrics.get("replay")
    if not replay or "models" not in replay:
        return "  not run"
    lines = [
        f"  trained on the {replay['train_interactions']} interactions before {replay['cutoff']}; "
        f"{replay['events_scored']} of the {replay['events']} later ones served as requests "
        f"({replay['unknown_item_share']:.1%} of them with an item the model never saw, "
        f"{replay['new_user_share']:.1%} from users it never saw)"
    ]
    for model, block in replay["models"].items():
        lines.append(f"  {REPLAY_LABELS.get(model, model):<38} NDCG@10 {block['ndcg@10']:.4f} ± "
                     f"{block['ndcg@10_se']:.4f}  HR@10 {block['hr@10']:.4f}")
    diff = replay["fresh_minus_frozen"]
    lines.append(f"  two-stage, fresh minus frozen history (paired): {diff['ndcg@10']:+.4f} ± {diff['ndcg@10_se']:.4f}")
    return "\n".join(lines)


def format_paired(metrics: Mapping[str, Any]) -> str:
    """The two-stage model minus each baseline, per user on the same test users (mean ± SE)."""
    lines = []
    for name, d in metrics.get("two_stage_vs", {}).items():
        lines.append(f"  vs {LABELS.get(name, name):<16} NDCG@10 {d['ndcg@10_mean']:+.4f} ± {d['ndcg@10_se']:.4f}")
    return "\n".join(lines)
