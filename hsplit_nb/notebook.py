"""Small helpers the notebooks share: quick mode, the preset behind a notebook, where outputs go, saving figures
and tables. Every notebook opens with `nb = start(name, quick, preset, out_dir)`."""
from __future__ import annotations

import os
from dataclasses import dataclass
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


@dataclass
class NotebookRun:
    """What a notebook's header settles: the mode, the preset its settings come from, and its output folder."""
    name: str
    quick: bool
    preset: str
    out: Path

    def config(self, **overrides):
        """The preset with the parameters cell's settings on top (None means keep the preset's value), so a notebook,
        the CLI and the tests mean the same thing by quick and full."""
        from .config import preset

        return preset(self.preset, **{k: v for k, v in overrides.items() if v is not None})


def start(name: str, quick: bool | None = None, preset: str | None = None, out_dir=None) -> NotebookRun:
    """The header every notebook shares: quick mode (HSPLIT_QUICK=1 unless `quick` says), the preset (`quick` in
    quick mode, `cpu_scale` otherwise), the output folder, and pandas' display width."""
    import pandas as pd

    pd.set_option("display.width", 160)
    quick = quick_mode() if quick is None else bool(quick)
    out = output_dir(out_dir or notebook_output(name, quick))
    return NotebookRun(name, quick, preset or ("quick" if quick else "cpu_scale"), out)
