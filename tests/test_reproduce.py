"""The reproduction runner: executes notebooks in order, writes HTML and times, names a failing cell."""
import nbformat
import pytest

from hsplit_nb.reproduce import NOTEBOOK_DIR, notebooks, run_notebooks


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
    _write(src / "00_ok.ipynb", "out_dir = 'x'", "import os\nprint(os.environ['HSPLIT_QUICK'], out_dir)")
    _write(src / "01_bad.ipynb", "out_dir = 'x'", "x = 1", "raise ValueError('broken on purpose')")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"01_bad\.ipynb: cell \d+ \(In \[\d+\]\) failed with ValueError: broken on purpose"):
        run_notebooks(out, directory=src, quick=True)
    assert (out / "00_ok.html").is_file() and (out / "times.csv").read_text().count("00_ok") == 1
    executed = nbformat.read(out / "00_ok.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert printed.startswith("1 ") and str(out / "00_ok") in printed  # quick mode and out_dir reached the kernel
    table = run_notebooks(out, directory=src, quick=True, only=["00"])
    assert list(table["notebook"]) == ["00_ok.ipynb"]
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
