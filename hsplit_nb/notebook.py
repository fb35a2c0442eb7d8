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


IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython", "open"}
PARAMETER_TYPES = (type(None), bool, int, float, str, list, tuple, dict)


def parameter_names(notebook: Path) -> set[str]:
    """The names the notebook's `parameters` cell assigns."""
    import ast
    import json

    cells = json.loads(Path(notebook).read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    names = set()
    for node in ast.parse(source).body:
        for target in getattr(node, "targets", [getattr(node, "target", None)]):
            names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)} if target is not None else set()
    return names


def check_parameters(name: str, namespace: dict, notebook: Path | None = None) -> None:
    """Refuse a parameter the notebook does not define (papermill's `-p` injects any name and runs the defaults
    for a misspelt one): every plain value in the namespace when `start` runs must be one of the parameters
    cell's names. A notebook file that is not at hand is not checked."""
    from .reproduce import NOTEBOOK_DIR

    notebook = notebook or NOTEBOOK_DIR / f"{name}.ipynb"
    if not notebook.is_file():
        return
    defined = parameter_names(notebook)
    unknown = sorted(k for k, v in namespace.items() if not k.startswith("_") and k not in IPYTHON_NAMES
                     and isinstance(v, PARAMETER_TYPES) and k not in defined)
    if unknown:
        raise ValueError(f"notebook {name}: {unknown[0]!r} is not one of its parameters; it defines "
                         f"{', '.join(sorted(defined))}")


def start(name: str, quick: bool | None = None, preset: str | None = None, out_dir=None) -> NotebookRun:
    """The header every notebook shares: quick mode (HSPLIT_QUICK=1 unless `quick` says), the preset (`quick` in
    quick mode, `cpu_scale` otherwise), the output folder, and pandas' display width. It first checks the names
    the notebook's namespace holds against its parameters cell (read from the caller's globals: `start` runs
    right after the parameters and imports)."""
    import inspect

    import pandas as pd

    check_parameters(name, inspect.currentframe().f_back.f_globals)

    pd.set_option("display.width", 160)
    quick = quick_mode() if quick is None else bool(quick)
    out = output_dir(out_dir or notebook_output(name, quick))
    return NotebookRun(name, quick, preset or ("quick" if quick else "cpu_scale"), out)
