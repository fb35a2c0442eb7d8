"""The reproduction runner: executes notebooks in order, writes HTML and times, names a failing cell."""
import re

import nbformat
import pandas as pd
import pytest

from hsplit_nb.reproduce import NOTEBOOK_DIR, PANEL_NOTE, notebooks, publish, run_notebooks


def _write(path, *sources, tags_first=True):
    nb = nbformat.v4.new_notebook()
    for i, src in enumerate(sources):
        cell = nbformat.v4.new_code_cell(src)
        if i == 0 and tags_first:
            cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    nbformat.write(nb, path)


def test_runner_executes_in_order_and_names_the_failing_cell(tmp_path):
    src = tmp_path / "nbs"
    src.mkdir()
    _write(src / "00_ok.ipynb", "out_dir = 'x'", "import os\nprint(os.environ['HSPLIT_QUICK'], out_dir)",
           "import time; time.sleep(1.5)",
           "from IPython.display import Image, display\nimport base64\n"
           "display(Image(base64.b64decode('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk'"
           "'+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==')))",  # a 1x1 PNG
           "time.sleep(1)")
    _write(src / "01_bad.ipynb", "out_dir = 'x'", "x = 1", "raise ValueError('broken on purpose')")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"01_bad\.ipynb: cell \d+ \(In \[\d+\]\) failed with ValueError: broken on purpose"):
        run_notebooks(out, directory=src, quick=True)
    assert (out / "00_ok.html").is_file() and (out / "times.csv").read_text().count("00_ok") == 1
    executed = nbformat.read(out / "00_ok.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert printed.startswith("1 ") and str(out / "00_ok") in printed  # quick mode and out_dir reached the kernel
    _write(src / "01_bad.ipynb", "out_dir = 'x'", "x = 1")  # mended, so that both notebooks have a time
    run_notebooks(out, directory=src, quick=True)
    table = run_notebooks(out, directory=src, quick=True, only=["00"])
    assert list(table["notebook"]) == ["00_ok.ipynb"]
    recorded = pd.read_csv(out / "times.csv")  # --only updates its notebook's time and keeps the other's
    assert list(recorded["notebook"]) == ["00_ok.ipynb", "01_bad.ipynb"]
    assert recorded["seconds"].iloc[0] == table["seconds"].iloc[0]
    # the first figure comes after the 1.5 s sleep and before the last 1 s one
    assert 1.5 <= table["first_figure_s"].iloc[0] < table["seconds"].iloc[0] - 0.9
    with pytest.raises(ValueError, match=r"no notebook matches \['07'\]"):
        notebooks(src, only=["07"])


def test_the_walkthrough_is_complete_and_committed_clean():
    names = [p.name for p in notebooks(NOTEBOOK_DIR)]
    assert names == ["00_quickstart.ipynb", "01_split_engine.ipynb", "02_iwi.ipynb", "03_armsc.ipynb",
                     "04_naa.ipynb", "05_heterogeneous_experiments.ipynb", "06_distributed.ipynb"]
    for p in notebooks(NOTEBOOK_DIR):
        nb = nbformat.read(p, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and "out_dir" in tagged[0].source, p.name
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{p.name} has outputs"
        heavy = [c for c in nb.cells if c.cell_type == "code" and c.source.count("\n") > 30]
        assert not heavy, f"{p.name}: a cell of over 30 lines belongs in hsplit_nb"


def test_publish_writes_a_page_per_notebook_with_prose_tables_and_figures_but_no_code(tmp_path):
    src, out, docs = tmp_path / "nbs", tmp_path / "out", tmp_path / "docs"
    src.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 00 · A lesson\n\nWhat we are about to see."),
                nbformat.v4.new_code_cell("out_dir = 'x'"),
                nbformat.v4.new_code_cell("import sys, pandas as pd\nprint('to stderr', file=sys.stderr)\n"
                                          "pd.DataFrame({'secret_code_name': [1]}).rename(columns=str.upper)"),
                nbformat.v4.new_code_cell("%matplotlib inline\nfrom matplotlib.figure import Figure\n"
                                          "from IPython.display import display\n"
                                          "fig = Figure(); fig.subplots().plot([0, 1]); display(fig)"),
                nbformat.v4.new_code_cell("import ipywidgets\nipywidgets.IntSlider()"),
                nbformat.v4.new_code_cell("from tqdm.notebook import tqdm\n"
                                          "for _ in tqdm(range(2), desc='rounds'): pass"),
                nbformat.v4.new_markdown_cell("What it shows.")]
    nb.cells[1].metadata["tags"] = ["parameters"]
    nbformat.write(nb, src / "00_lesson.ipynb")
    run_notebooks(out, directory=src, quick=True)
    (docs / "00_lesson_files").mkdir(parents=True)
    (docs / "00_lesson_files" / "output_9_0.png").write_bytes(b"a figure of an earlier page")
    [page] = publish(out, docs)
    text = page.read_text()
    assert page.name == "00_lesson.md" and "# 00 · A lesson" in text and "What it shows." in text
    assert "SECRET_CODE_NAME" in text and "<style" not in text  # the table, without pandas' CSS
    assert "secret_code_name" not in text and "to stderr" not in text and "out_dir" not in text  # no code, no stderr
    assert text.count(PANEL_NOTE) == 1 and "IntSlider" not in text and "rounds" not in text  # a bar is no panel
    assert re.search(r"\(`make reproduce`, \d+\.\d min, first figure after \d+\.\d min\)", text)
    [figure] = (docs / "00_lesson_files").glob("*.png")
    assert f"00_lesson_files/{figure.name}" in text and figure.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match="no executed notebooks"):
        publish(tmp_path / "nothing", docs)
