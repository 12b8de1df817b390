"""PNG plots from metrics.jsonl: one file per quantity in <run_dir>/plots/, and a sweep comparison.

Readable without any tracker account; drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# One PNG per entry: file name → the metrics drawn together (eval_* versions are added when present).
RUN_PLOTS = {
    "loss": ("loss",),
    "rewards_margins": ("rewards/margins",),
    "rewards_accuracies": ("rewards/accuracies",),
    "rewards_chosen_rejected": ("rewards/chosen", "rewards/rejected"),
    "grad_norm": ("grad_norm",),
    "learning_rate": ("learning_rate",),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(records: list[dict[str, Any]], folder: Path, title: str) -> list[Path]:
    """Write one PNG per quantity that the run logged; returns the files written."""
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys in RUN_PLOTS.items():
        curves = [(label, *_series(records, label)) for key in keys for label in (key, f"eval_{key}")]
        curves = [c for c in curves if c[1]]
        if not curves:
            continue
        figure, axis = plt.subplots(figsize=(6, 3.6))
        for label, steps, values in curves:
            axis.plot(steps, values, marker="o" if len(steps) < 3 else None, label=label)
        axis.set_xlabel("step")
        axis.set_title(f"{title}: {name.replace('_', ' ')}", fontsize=10)
        axis.grid(alpha=0.3)
        if len(curves) > 1:
            axis.legend(fontsize=8)
        figure.tight_layout()
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def plot_sweep(members: list[tuple[str, list[dict[str, Any]]]], path: Path,
               keys: tuple[str, ...] = ("rewards/margins", "rewards/accuracies")) -> Path:
    """Members' curves side by side: one panel per metric, one line per member (labelled by its swept values)."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 3.8), squeeze=False)
    for axis, key in zip(axes[0], keys):
        for label, records in members:
            steps, values = _series(records, key)
            if steps:
                axis.plot(steps, values, label=label)
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
