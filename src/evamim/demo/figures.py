"""The demo report's PNG figures (matplotlib, Agg backend: no display needed).

Every function takes plain numbers (lists of (step, value) pairs, arrays) and a path, and writes one PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

Curve = Sequence[tuple[float, float]]
MASK_COLOUR = (150, 190, 255)  # no scene uses it: masked patches stand out on every background


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(panels: Mapping[str, tuple[str, Mapping[str, Curve]]], path: Path) -> Path:
    """One panel per entry ``title -> (y label, {line label: curve})``, side by side in rows of two."""
    plt = _pyplot()
    rows = (len(panels) + 1) // 2
    figure, axes = plt.subplots(rows, 2, figsize=(11, 3.6 * rows), squeeze=False)
    for ax, (title, (ylabel, lines)) in zip(axes.flat, panels.items()):
        for label, curve in lines.items():
            if curve:
                steps, values = zip(*curve)
                ax.plot(steps, values, label=label, linewidth=1.6)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    figure.tight_layout()
    return _save(figure, path, plt)


def masked_predictions(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], cosines: Sequence[np.ndarray],
                       path: Path, title: str) -> Path:
    """Per scene (columns): the image, the student's input (masked patches greyed out), and the per-patch cosine
    between the student's prediction and the teacher's target (masked patches outlined).

    ``images``: (H, W, 3) uint8; ``masks``: (h, w) bool patch grids (True = masked); ``cosines``: (h, w) floats."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    count = len(images)
    figure, axes = plt.subplots(3, count, figsize=(1.9 * count + 1.2, 6.2), squeeze=False)
    shown = None
    for column, (image, mask, cosine) in enumerate(zip(images, masks, cosines)):
        side, grid = image.shape[0], mask.shape[0]
        patch = side // grid
        hidden = image.copy()
        for row_index, column_index in zip(*np.nonzero(mask)):
            hidden[row_index * patch:(row_index + 1) * patch, column_index * patch:(column_index + 1) * patch] = MASK_COLOUR
        axes[0, column].imshow(image)
        axes[1, column].imshow(hidden)
        shown = axes[2, column].imshow(cosine, vmin=-1, vmax=1, cmap="RdYlGn")
        for row_index, column_index in zip(*np.nonzero(mask)):
            axes[2, column].add_patch(Rectangle((column_index - 0.5, row_index - 0.5), 1, 1, fill=False,
                                                edgecolor="black", linewidth=1.5))
        for ax in axes[:, column]:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, label in zip(axes[:, 0], ("scene", "student's input\n(masked = blue)", "cosine to teacher\n(masked outlined)")):
        ax.set_ylabel(label)
    figure.suptitle(title)
    figure.colorbar(shown, ax=axes[2, :].tolist(), shrink=0.9, label="cosine")
    return _save(figure, path, plt)


def accuracy_bars(models: Sequence[str], series: Mapping[str, Sequence[float]], path: Path, *, chance: float,
                  title: str) -> Path:
    """Grouped bars: one group per model, one bar per series (e.g. kNN, linear probe), values in percent."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(models) + 2), 4.2))
    width = 0.8 / max(len(series), 1)
    positions = np.arange(len(models))
    for k, (label, values) in enumerate(series.items()):
        bars = ax.bar(positions + (k - (len(series) - 1) / 2) * width, values, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"chance ({chance:.1f}%)")
    ax.set_xticks(positions, models)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return _save(figure, path, plt)


def accuracy_curves(lines: Mapping[str, Curve], path: Path, *, chance: float, title: str) -> Path:
    """Accuracy (percent) against training step, one line per run, with the chance level."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, curve in lines.items():
        if curve:
            steps, values = zip(*curve)
            ax.plot(steps, values, marker="o", markersize=3, label=label)
    ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"chance ({chance:.1f}%)")
    ax.set_xlabel("step")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    return _save(figure, path, plt)


def _save(figure, path: Path, plt) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
