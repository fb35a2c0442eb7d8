"""Notebooks 01-04 in a real browser, as a user meets them: JupyterLab on loopback (quick mode), headless Chromium
driven by selenium. Every cell runs without an error, every panel renders as live controls, and moving a control
changes the panel's table or figure to a figure that is not blank, with nothing sent to the Log Console.
Screenshots go to results/browser/ (a test artifact).

On CI (.ci/run installs Debian's chromium, chromium-driver and fonts-dejavu-core) the test always runs; elsewhere,
without them, it is skipped with the command that installs them."""
from __future__ import annotations

import base64
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

try:
    from selenium.common.exceptions import StaleElementReferenceException as STALE
except ImportError:  # without selenium the browser tests skip; nothing can go stale
    STALE = ()

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "results" / "browser"
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = ("apt-get install chromium chromium-driver fonts-dejavu-core (Debian, as root) and "
           "pip install selenium (in .venv: make install)")
# what the user moves in each notebook's panel: (kind, how many steps)
CONTROLS = {"01_split_engine": [("slider", 3)], "02_iwi": [("slider", 5)], "03_armsc": [("slider", 4)],
            "04_naa": [("dropdown", 1), ("slider", 5)]}


def _browser_or_skip():
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing = "selenium"
    else:
        missing = next((p for p in (CHROMIUM, DRIVER) if not Path(p).exists()), None)
    if missing:
        message = f"the browser test needs {missing}: {INSTALL}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab serving a copy of the notebooks (so autosave never writes outputs into the repository)."""
    _browser_or_skip()
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    _write_probe(root / "notebooks" / "probe.ipynb")
    news = root / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))  # no pop-up over the screenshots
    token, port = secrets.token_hex(16), _free_port()
    env = {**os.environ, "HSPLIT_QUICK": "1", "JUPYTERLAB_SETTINGS_DIR": str(root / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(root / "workspaces"), "JUPYTER_CONFIG_DIR": str(root / "config")}
    log = open(root / "lab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
                             f"--port={port}", "--allow-root", f"--IdentityProvider.token={token}",
                             "--LabApp.expose_app_in_browser=True", f"--ServerApp.root_dir={root}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"JupyterLab did not start: {(root / 'lab.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url, token
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def driver(lab):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield d
    d.quit()


STATE = """
const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
if (!panel || !panel.sessionContext || !panel.content || !panel.content.widgets) return null;
const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
const cells = panel.content.widgets.filter(c => c.model.type === 'code').map(c => ({
    count: c.model.executionCount,
    errors: c.model.outputs.toJSON().filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)}));
return {ready: panel.sessionContext.isReady, status: kernel ? kernel.status : null, cells: cells};
"""


def _wait(fn, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = fn()
        except STALE:  # the panel replaced an element while it was read (it is updating): read again
            value = None
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _write_probe(path):
    """A notebook whose slider prints from its callback: JupyterLab sends that print to the Log Console, so the
    test's Log Console check must see it (the check can fail)."""
    import nbformat

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell(
        "import ipywidgets as w\nfrom IPython.display import display\n"
        "s = w.IntSlider(value=1, min=0, max=10)\nout = w.Output()\n"
        "s.observe(lambda change: print('a stray print from a callback', change['new']), names='value')\n"
        "display(w.VBox([s, out]))")]
    nbformat.write(nb, path)


def _shutdown_kernels(url, token):
    """Stop every kernel the test started, so the next notebook has the cores."""
    headers = {"Authorization": f"token {token}"}
    kernels = json.load(urllib.request.urlopen(urllib.request.Request(f"{url}/api/kernels", headers=headers)))
    for k in kernels:
        urllib.request.urlopen(urllib.request.Request(f"{url}/api/kernels/{k['id']}", headers=headers,
                                                      method="DELETE"))


def _run_all(driver, url, token, name):
    driver.get(f"{url}/lab/tree/notebooks/{name}.ipynb?reset&token={token}")  # reset: only this notebook open
    _wait(lambda: (s := driver.execute_script(STATE)) and s["ready"] and s["status"] == "idle", 180,
          f"{name}'s kernel")
    driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")

    def done():
        s = driver.execute_script(STATE)
        return s if s["status"] == "idle" and all(c["count"] is not None for c in s["cells"]) else None
    time.sleep(2)
    state = _wait(done, 600, f"{name} to run all cells")
    errors = [e for c in state["cells"] for e in c["errors"]]
    assert not errors, f"{name}: a cell failed: {errors[0]}"
    shown_as_text = driver.execute_script(
        "return [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output pre')]"
        ".some(p => p.textContent.includes('VBox(children'));")
    assert not shown_as_text, f"{name}: a panel was shown as text, not as live controls"


def _panel(driver):
    """The last panel of the notebook (the one its 'Try it' section shows): its controls and its output area."""
    from selenium.webdriver.common.by import By

    boxes = driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .widget-vbox")
    assert boxes, "no panel rendered as a live widget"
    box = boxes[-1]
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", box)
    return box, box.find_element(By.CSS_SELECTOR, ".widget-output")


def _output(area) -> dict:
    from selenium.webdriver.common.by import By

    images = [i.get_attribute("src") for i in area.find_elements(By.TAG_NAME, "img")]
    return {"html": area.get_attribute("innerHTML"), "images": images, "text": area.text}


def _not_blank(src: str) -> bool:
    """A data-URL PNG that is more than one colour over most of its area."""
    import matplotlib.image as mpimg
    import numpy as np

    pixels = mpimg.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
    return bool(np.asarray(pixels)[..., :3].std() > 0.02)


def _move(driver, box, kind: str, steps: int):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    if kind == "dropdown":
        select = Select(box.find_element(By.CSS_SELECTOR, ".widget-dropdown select"))
        current = select.first_selected_option.text
        choice = next(o.text for o in reversed(select.options) if o.text != current)
        select.select_by_visible_text(choice)
        return
    handle = box.find_element(By.CSS_SELECTOR, ".widget-slider .noUi-handle")
    at_top = float(handle.get_attribute("aria-valuenow")) >= float(handle.get_attribute("aria-valuemax"))
    handle.click()
    for _ in range(steps):
        handle.send_keys(Keys.ARROW_LEFT if at_top else Keys.ARROW_RIGHT)


def _log_console_count(driver) -> int:
    """Messages in JupyterLab's Log Console, as its status-bar item shows them: hidden while there are none."""
    item = driver.execute_script(
        "const el = document.querySelector('.jp-LogConsoleStatusItem');"
        "return el ? {hidden: el.classList.contains('lm-mod-hidden'), text: el.textContent} : null;")
    if item is None or item["hidden"]:
        return 0
    digits = "".join(ch for ch in item["text"] if ch.isdigit())
    return int(digits) if digits else 1


@pytest.mark.parametrize("name", list(CONTROLS))
def test_a_notebook_runs_in_jupyterlab_and_its_panel_follows_its_controls(lab, driver, name):
    url, token = lab
    _run_all(driver, url, token, name)
    box, area = _panel(driver)
    assert box.find_elements("css selector", ".widget-slider, .widget-dropdown"), f"{name}: no live control"
    for kind, steps in CONTROLS[name]:
        before = _wait(lambda: _output(area), 30, f"{name}'s panel to be read")
        _move(driver, box, kind, steps)
        def changed():
            o = _output(area)
            return o if o["html"] != before["html"] and o["images"] else None
        after = _wait(changed, 60, f"{name}'s panel to follow its {kind}")
        assert all(_not_blank(src) for src in after["images"]), f"{name}: a blank figure after moving the {kind}"
        assert after["text"] != before["text"] or after["images"] != before["images"]
    time.sleep(1)
    assert _log_console_count(driver) == 0, f"{name}: output reached the Log Console"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    _shutdown_kernels(url, token)


def test_the_log_console_check_sees_a_print_that_lands_there(lab, driver):
    url, token = lab
    _run_all(driver, url, token, "probe")
    assert _log_console_count(driver) == 0
    box, _ = _panel(driver)
    _move(driver, box, "slider", 2)
    _wait(lambda: _log_console_count(driver) > 0, 30, "the stray print to reach the Log Console")
    _shutdown_kernels(url, token)
