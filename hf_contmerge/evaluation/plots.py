"""The two figures a step's card shows, drawn with matplotlib's Agg backend (no display needed):
the matrix as a heatmap (rows: steps, columns: tasks) and the seen average over the steps, with the
reference rows' averages over the same tasks as lines."""

from __future__ import annotations

from pathlib import Path

from .record import Evaluation, _mean

MATRIX_PNG = "matrix.png"
PROGRESS_PNG = "progress.png"


def draw(evaluation: Evaluation, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = [t.name for t in evaluation.tasks]
    T = len(evaluation.matrix)
    values = [[float("nan") if s is None else s for s in row] for row in evaluation.matrix]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 1.0 + 0.5 * T), dpi=100)
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(T), [f"step {k + 1}" for k in range(T)])
    for k, row in enumerate(evaluation.matrix):
        for i, s in enumerate(row):
            if s is not None:
                ax.text(i, k, f"{s:.3g}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, ax=ax)
    ax.set_title("score of the merged model after each step")
    fig.tight_layout()
    fig.savefig(folder / MATRIX_PNG)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    steps = list(range(1, T + 1))
    ax.plot(steps, [float("nan") if s is None else s for s in evaluation.summary.seen_average], marker="o", label="merged")
    counts = [t.higher_is_better and t.item > 0 for t in evaluation.tasks]
    for label, ref in (("base", evaluation.base), ("individual fine-tunes", evaluation.finetuned)):
        if ref is not None:
            line = [_mean([ref[c] for c, t in enumerate(evaluation.tasks) if counts[c] and 0 < t.item <= k and ref[c] is not None])
                    for k in steps]
            ax.plot(steps, [float("nan") if v is None else v for v in line], linestyle="--", label=label)
    ax.set_xticks(steps)
    ax.set_xlabel("step")
    ax.set_ylabel("average over the tasks seen")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / PROGRESS_PNG)
    plt.close(fig)
    return [MATRIX_PNG, PROGRESS_PNG]
