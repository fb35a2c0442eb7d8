"""Small helpers the notebooks share: quick mode, where outputs go, saving figures and tables."""
from __future__ import annotations

import os
from pathlib import Path

from .io import atomic_write_text
from .plots import save_figure as _save_figure


def quick_mode() -> bool:
    """Quick mode (tiny model, few steps) when HSPLIT_QUICK=1: what CI runs."""
    return os.environ.get("HSPLIT_QUICK", "0") == "1"


def notebook_output(name: str, quick: bool | None = None) -> Path:
    """Default output folder of a notebook run from notebooks/: results/notebooks/<name>, or
    results/notebooks-quick/<name> in quick mode, so `make test` never overwrites `make reproduce`."""
    quick = quick_mode() if quick is None else quick
    return Path("..") / "results" / ("notebooks-quick" if quick else "notebooks") / name


def output_dir(path) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_figure(fig, out_dir, name: str) -> None:
    """Write a figure as PNG (atomically) beside the notebook's other outputs and show it once. Returns nothing,
    so a cell that ends with it shows the figure and no path."""
    import matplotlib.pyplot as plt
    from IPython.display import display

    _save_figure(fig, out_dir, name)
    display(fig)
    plt.close(fig)  # a pyplot figure would otherwise be shown a second time at the cell's end


def save_table(df, out_dir, name: str) -> Path:
    return atomic_write_text(output_dir(out_dir) / f"{name}.csv", df.to_csv(index=False))
