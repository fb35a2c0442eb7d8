"""The main job: execute every notebook in full mode into results/ (executed .ipynb, HTML, PNG, CSV)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from .io import atomic_write_text

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def notebooks(directory=NOTEBOOK_DIR, only=None) -> list[Path]:
    found = sorted(Path(directory).glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = [p for p in found if any(p.name.startswith(o) or p.stem == o for o in only)]
        missing = [o for o in only if not any(p.name.startswith(o) or p.stem == o for p in found)]
        if missing:
            raise ValueError(f"no notebook matches {missing}; notebooks: {[p.name for p in found]}")
        found = wanted
    return found


def run_notebooks(out_dir="results/notebooks", directory=NOTEBOOK_DIR, quick: bool = False, only=None,
                  parameters: dict | None = None) -> pd.DataFrame:
    """Execute notebooks in order with papermill; each writes figures and tables under out_dir/<name>/.

    A failing notebook stops the run with an error that names the notebook and the cell."""
    import nbformat
    import papermill
    from nbconvert import HTMLExporter
    from papermill.exceptions import PapermillExecutionError

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["HSPLIT_QUICK"] = "1" if quick else "0"  # the kernels inherit it
    rows = []
    paths = notebooks(directory, only)
    bar = tqdm(paths, desc="notebooks")
    for nb in bar:
        bar.set_postfix(notebook=nb.name)
        target = out / nb.name
        start = time.perf_counter()
        try:
            papermill.execute_notebook(str(nb), str(target), parameters={"out_dir": str(out / nb.stem),
                                                                         **(parameters or {})},
                                       cwd=str(nb.parent), progress_bar=False, kernel_name="python3",
                                       language="python")
        except PapermillExecutionError as exc:
            raise RuntimeError(f"{nb.name}: cell {exc.cell_index} (In [{exc.exec_count}]) failed with "
                               f"{exc.ename}: {exc.evalue}; the partly executed notebook is {target}") from None
        seconds = time.perf_counter() - start
        html, _ = HTMLExporter().from_notebook_node(nbformat.read(target, as_version=4))
        atomic_write_text(target.with_suffix(".html"), html)
        rows.append({"notebook": nb.name, "seconds": round(seconds, 1), "mode": "quick" if quick else "full"})
        atomic_write_text(out / "times.csv", pd.DataFrame(rows).to_csv(index=False))
    table = pd.DataFrame(rows)
    total = table["seconds"].sum() if len(table) else 0.0
    print(table.to_string(index=False))
    print(f"total: {total / 60:.1f} min; executed notebooks, HTML, figures and tables in {out}/")
    return table
