"""Matplotlib figures written atomically (headless backend)."""

from __future__ import annotations

from pathlib import Path


def figure(size=(6, 4), ncols: int = 1):
    """A figure and its axes (one, or an array of ``ncols`` side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=size)


def save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)
