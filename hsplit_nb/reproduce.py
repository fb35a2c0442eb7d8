"""The main job: execute every notebook in full mode into results/ (executed .ipynb, HTML, PNG, CSV)."""
from __future__ import annotations

import os
import re
import shutil
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
    paths = notebooks(directory, only)
    rows = _earlier_times(out / "times.csv", [p.name for p in paths], "quick" if quick else "full")
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
        executed = nbformat.read(target, as_version=4)
        html, _ = HTMLExporter().from_notebook_node(executed)
        atomic_write_text(target.with_suffix(".html"), html)
        rows.append({"notebook": nb.name, "seconds": round(seconds, 1),
                     "first_figure_s": first_figure_seconds(executed), "mode": "quick" if quick else "full"})
        atomic_write_text(out / "times.csv", pd.DataFrame(rows).sort_values("notebook").to_csv(index=False))
    table = pd.DataFrame([r for r in rows if r["notebook"] in {p.name for p in paths}])
    total = table["seconds"].sum() if len(table) else 0.0
    print(table.to_string(index=False))
    print(f"total: {total / 60:.1f} min; executed notebooks, HTML, figures and tables in {out}/")
    return table


def _earlier_times(path: Path, running: list[str], mode: str) -> list[dict]:
    """The rows of times.csv for notebooks not run now (same mode), so `--only` updates its notebooks' times and
    keeps the others'."""
    if not path.is_file():
        return []
    earlier = pd.read_csv(path)
    keep = earlier[~earlier["notebook"].isin(running) & (earlier["mode"] == mode)]
    return keep.to_dict("records")


def first_figure_seconds(executed) -> float | None:
    """Seconds from the start of an executed notebook's first cell to the end of the first cell that shows a
    figure (papermill's per-cell timestamps): how long a reader waits for the first picture. None without one."""
    cells = [c for c in executed.cells if c.cell_type == "code" and c.metadata.get("papermill", {}).get("start_time")]
    if not cells:
        return None
    t0 = pd.Timestamp(cells[0].metadata["papermill"]["start_time"])
    for cell in cells:
        if any("image/png" in o.get("data", {}) for o in cell.get("outputs", [])):
            return round((pd.Timestamp(cell.metadata["papermill"]["end_time"]) - t0).total_seconds(), 1)
    return None


WIDGET = "application/vnd.jupyter.widget-view+json"
PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm.auto's widget, as its text fallback shows it: not a panel
PANEL_NOTE = "*(An interactive panel in the notebook: open it in JupyterLab to move its controls.)*"


def _for_reading(nb):
    """An executed notebook as a reader of the docs sees it: no code, no progress bars or warnings (stderr), and a
    line in place of each interactive panel (its state lives in a kernel, not in a page)."""
    import nbformat

    cells = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            cells.append(cell)
            continue
        if "parameters" in cell.metadata.get("tags", []) or "injected-parameters" in cell.metadata.get("tags", []):
            continue
        outputs = []
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream" and o.get("name") == "stderr":
                continue
            if WIDGET in o.get("data", {}):
                if not PROGRESS_BAR.search(o["data"].get("text/plain", "")):
                    cells.append(nbformat.v4.new_markdown_cell(PANEL_NOTE))
                continue
            outputs.append(o)
        if outputs:
            cell.outputs = outputs
            cells.append(cell)
    nb.cells = cells
    return nb


def _took(times: pd.DataFrame | None, name: str) -> str:
    """A page head's ', 4.4 min, first figure after 1.9 min' from times.csv ('' when the notebook is not in it)."""
    row = None if times is None else times[times["notebook"] == name]
    if row is None or row.empty:
        return ""
    first = row["first_figure_s"].iloc[0] if "first_figure_s" in row else None
    took = f", {row['seconds'].iloc[0] / 60:.1f} min"
    return took if first is None or pd.isna(first) else f"{took}, first figure after {first / 60:.1f} min"


def publish(executed_dir="results/notebooks", dest="docs/notebooks", max_bytes: int = 2 * 2**20) -> list[Path]:
    """One Markdown page per executed notebook in `executed_dir` (its prose, tables and figures; the figures as PNG
    files beside it), so a reader of the repository sees every notebook's results without running anything.
    A figure over `max_bytes` is refused: the pages are committed."""
    import nbformat
    from nbconvert import MarkdownExporter

    executed, out = Path(executed_dir), Path(dest)
    found = sorted(executed.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no executed notebooks in {executed}: run `python -m hsplit_nb reproduce` first")
    times = pd.read_csv(executed / "times.csv") if (executed / "times.csv").is_file() else None
    pages = []
    for path in found:
        nb = _for_reading(nbformat.read(path, as_version=4))
        exporter = MarkdownExporter(exclude_input=True)
        body, resources = exporter.from_notebook_node(nb, resources={"output_files_dir": f"{path.stem}_files"})
        shutil.rmtree(out / f"{path.stem}_files", ignore_errors=True)  # figures of an earlier page go with it
        for name, data in resources.get("outputs", {}).items():
            if len(data) > max_bytes:
                raise ValueError(f"{path.name}: figure {name} is {len(data) / 2**20:.1f} MiB, over the "
                                 f"{max_bytes / 2**20:.0f} MiB allowed for committed pages")
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        took = _took(times, path.name)
        body = re.sub(r"<style scoped>.*?</style>\n?", "", body, flags=re.S)  # pandas' inline CSS: noise in a page
        head = (f"<!-- generated by `python -m hsplit_nb reproduce --publish` from {path.name}; do not edit -->\n"
                f"*From the last full reproduction (`make reproduce`{took}). The notebook itself: "
                f"[notebooks/{path.name}](../../notebooks/{path.name}).*\n\n")
        pages.append(atomic_write_text(out / f"{path.stem}.md", head + body))
    return pages
