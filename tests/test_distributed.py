"""Multi-process split training on loopback (tiny LLaMA, gloo): one server and two client processes under
torchrun equal the in-process federation; the bytes on the wire equal the simulation's accounting; a
client killed mid-run leaves the server running; a killed server resumes from its checkpoints."""
import json
import os

import pandas as pd
import pytest
import torch

from conftest import preset_fields
from hsplit_nb.adapters import base_weight, read_adapter
from hsplit_nb.distributed import DONE_FILE, launch, wire_bytes, worker_main
from hsplit_nb.distributed.launcher import _descendants as launcher_descendants
from hsplit_nb.clientdata import load_splits
from hsplit_nb.config import ExperimentConfig
from hsplit_nb.experiment import _Run
from hsplit_nb.federation import BYTE_KINDS

BASE = preset_fields("quick", num_clients=2, budgets=[4_500_000, 11_500_000], eval_mrs=3, num_beams=1,
                     max_new_tokens=8, final_metrics=False)
# c0's budget grows at round 2: under ARMSC's round time (a server of 2e10 FLOP/s, links of 1e10 B/s) c1's
# split moves deeper, so c1 must receive the merged weights of the blocks it newly hosts
GROWTH = [{"type": "budget", "client": "c0", "round": 2, "memory": 4_500_000}]
GROWTH_SETTING = {"budgets": [3_500_000, 11_500_000], "server_speed": 2e10, "bandwidth": 1e10}
COLUMNS = ["val_ppl", "train_loss", "sim_time_s", "bytes_up", "bytes_down", "split_c0", "split_c1", "rank_c0",
           "rank_c1", "present"]
TIMEOUTS = dict(step_timeout=60, idle_timeout=120, init_timeout=60, progress=False, timeout=600)


def in_process(cfg: ExperimentConfig, method: str):
    """The simulation of one method: its federation after the last round, its rows and its client rows."""
    run = _Run(cfg, method, load_splits(cfg), None)
    rows, client_rows = [], []
    run.run(rows, client_rows, lambda *a: None)
    return run.fed, pd.DataFrame(rows), pd.DataFrame(client_rows)


def assert_rows_equal(sim: pd.DataFrame, real: pd.DataFrame, rounds=None):
    sim, real = sim.set_index("round"), real.set_index("round")
    rounds = list(sim.index) if rounds is None else rounds
    pd.testing.assert_frame_equal(sim.loc[rounds, COLUMNS], real.loc[rounds, COLUMNS], check_dtype=False,
                                  atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def growth_run(tmp_path_factory):
    cfg = ExperimentConfig(**{**BASE, **GROWTH_SETTING}, events=GROWTH, methods=["hsplitlora"])
    out = tmp_path_factory.mktemp("dist") / "run"
    df = launch(cfg, out, dump_clients=True, **TIMEOUTS)
    return cfg, out, df, in_process(cfg, "hsplitlora")


def test_two_clients_with_different_splits_equal_the_in_process_federation(growth_run):
    cfg, out, df, (fed, sim_rows, sim_clients) = growth_run
    assert_rows_equal(sim_rows, df)
    first = df.set_index("round").loc[1]
    assert first["split_c0"] != first["split_c1"]
    grown = sim_clients[(sim_clients["round"] == 2) & (sim_clients["client"] == "c1")].iloc[0]
    assert df.set_index("round").loc[2, "split_c1"] > first["split_c1"] and grown["weights_down"] > 0
    # the server's merged weights and every adapter it holds
    server = torch.load(out / "server" / "hsplitlora.pt", weights_only=False)
    assert set(server["touched"]) == fed.touched and fed.touched
    for n, w in server["touched"].items():
        torch.testing.assert_close(w, base_weight(fed.pm, n), atol=1e-5, rtol=0)
    for adapter, mats in fed.state()["adapters"].items():
        for n, f in mats.items():
            torch.testing.assert_close(server["adapters"][adapter][n].A, f.A, atol=1e-5, rtol=0)
            torch.testing.assert_close(server["adapters"][adapter][n].B, f.B, atol=1e-5, rtol=0)
    # what each client process holds: its blocks' merged weights and its device-side adapters
    for c in fed.clients:
        held = torch.load(out / "clients" / "hsplitlora" / f"{c.name}.pt", weights_only=False)
        assert held["split_point"] == c.split_point
        assert held["weights"] and all(int(n.split(".")[2]) < c.split_point for n in held["weights"])
        for n, w in held["weights"].items():
            torch.testing.assert_close(w, base_weight(fed.pm, n), atol=1e-5, rtol=0)
        assert set(held["adapters"]) == {n for n in held["adapters"] if int(n.split(".")[2]) < c.split_point}
        assert held["adapters"]
        for n, f in held["adapters"].items():
            ref = read_adapter(fed.pm, n, c.name)
            torch.testing.assert_close(f.A, ref.A, atol=1e-5, rtol=0)
            torch.testing.assert_close(f.B, ref.B, atol=1e-5, rtol=0)


def test_bytes_on_the_wire_equal_the_simulated_accounting(growth_run):
    cfg, out, df, (fed, sim_rows, sim_clients) = growth_run
    wire = wire_bytes(out).set_index("client")
    simulated = sim_clients.groupby("client")[list(BYTE_KINDS)].sum()
    for client in cfg.client_names():
        for kind in BYTE_KINDS:
            assert wire.loc[client, kind] == simulated.loc[client, kind], (client, kind)
    assert simulated["smashed_up"].min() > 0 and simulated["calibration_up"].min() > 0
    assert simulated["weights_down"].sum() > 0 and simulated["adapter_down"].min() > 0
    # protocol overhead is counted apart: headers and control messages
    assert wire["header_up"].min() > 0 and wire["control_down"].min() > 0


def test_non_merging_non_split_and_returning_clients_equal_the_simulation(tmp_path):
    """SplitLoRA (shared server adapter, FedAvg, fold on reconfiguration), HetLoRA (no split) and the
    zero-padding ablation, with c1 away for round 2 (it catches up on return) and c0's budget growing."""
    methods = ["splitlora", "hetlora", "hsplitlora-no-naa"]
    events = [{"type": "dropout", "client": "c1", "start": 2, "end": 2},
              {"type": "budget", "client": "c0", "round": 3, "memory": 11_500_000}]
    cfg = ExperimentConfig(**{**BASE, "rounds": 3, "local_steps": 2}, events=events, methods=methods)
    df = launch(cfg, tmp_path / "run", **TIMEOUTS)
    wire = wire_bytes(tmp_path / "run").set_index(["method", "client"])
    for method in methods:
        _, sim_rows, sim_clients = in_process(cfg, method)
        assert_rows_equal(sim_rows, df[df["method"] == method])
        simulated = sim_clients.groupby("client")[list(BYTE_KINDS)].sum()
        for client in cfg.client_names():
            for kind in BYTE_KINDS:
                assert wire.loc[(method, client), kind] == simulated.loc[client, kind], (method, client, kind)
        returned = sim_clients[(sim_clients["round"] == 3) & (sim_clients["client"] == "c1")].iloc[0]
        assert returned["weights_down"] > 0, method  # the catch-up crossed the wire


def test_a_gamma_set_in_the_config_reaches_the_client_processes(tmp_path):
    """HetLoRA's regulariser runs in the client processes: with gamma 0.3 they must train as the simulation
    does at 0.3, which differs measurably from the default 0.9."""
    cfg = ExperimentConfig(**{**BASE, "rounds": 2, "local_steps": 3, "gamma": 0.3}, methods=["hetlora"])
    df = launch(cfg, tmp_path / "run", **TIMEOUTS)
    _, at_03, _ = in_process(cfg, "hetlora")
    _, at_09, _ = in_process(cfg.replace(gamma=0.9), "hetlora")
    assert_rows_equal(at_03, df)
    assert abs(at_03.set_index("round").loc[2, "val_ppl"] - at_09.set_index("round").loc[2, "val_ppl"]) > 1e-3


def test_a_killed_client_leaves_the_server_running_and_is_recorded_as_lost(tmp_path):
    cfg = ExperimentConfig(**{**BASE, "rounds": 3, "local_steps": 2}, methods=["hsplitlora-no-iwi"])
    df = launch(cfg, tmp_path / "run", kill="c1:2:1", **TIMEOUTS)
    rows = df.set_index("round")
    assert list(rows.index) == [0, 1, 2, 3]
    _, sim_rows, _ = in_process(cfg, "hsplitlora-no-iwi")
    assert_rows_equal(sim_rows, df, rounds=[0, 1])  # the rounds before the fault are the simulation's
    assert "lost: c1" in rows.loc[2, "reasons"] and rows.loc[2, "present"] == 1 and rows.loc[3, "present"] == 1
    # c0 kept training: better than the untrained model (not necessarily than round 1: since a reconfiguration
    # restarts only what changed, the shared server set keeps learning through c1's loss, and on the tiny model
    # validation PPL moves by a few percent from round to round)
    assert rows.loc[3, "val_ppl"] < rows.loc[0, "val_ppl"] and rows.loc[3, "train_loss"] < rows.loc[1, "train_loss"]
    lost = df.attrs["lost"]
    assert list(lost["client"]) == ["c1"] and list(lost["round"]) == [2]
    clients = pd.read_csv(tmp_path / "run" / "clients.csv").set_index(["round", "client"])
    assert clients.loc[(3, "c1"), "smashed_up"] == 0 and clients.loc[(3, "c0"), "smashed_up"] > 0


def test_a_killed_server_resumes_from_its_checkpoint_to_the_uninterrupted_numbers(tmp_path):
    cfg = ExperimentConfig(**{**BASE, "rounds": 3, "local_steps": 2}, methods=["hsplitlora"])
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="server process exited"):
        launch(cfg, out, kill="server:2:1", **TIMEOUTS)
    saved = torch.load(out / "checkpoints" / "hsplitlora.pt", weights_only=False)
    assert saved["round"] == 1  # round 1 was checkpointed before the server died in round 2
    df = launch(cfg, out, **TIMEOUTS)
    _, sim_rows, _ = in_process(cfg, "hsplitlora")
    assert_rows_equal(sim_rows, df)
    assert json.loads((out / DONE_FILE).read_text())["status"] == "ok"


def test_bad_launch_arguments_are_named(tmp_path):
    cfg = ExperimentConfig(**BASE, methods=["hsplitlora"])
    with pytest.raises(ValueError, match="step_timeout must be a positive"):
        launch(cfg, tmp_path / "x", step_timeout=0)
    with pytest.raises(ValueError, match="'c7' is not a participant"):
        launch(cfg, tmp_path / "x", kill="c7:1:1")
    with pytest.raises(ValueError, match="--kill must look like"):
        launch(cfg, tmp_path / "x", kill="c1-2")


def test_the_worker_refuses_to_start_outside_torchrun(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    cfg = ExperimentConfig(**BASE, methods=["hsplitlora"])
    cfg.save(tmp_path / "c.json")
    with pytest.raises(SystemExit, match="start this module with torchrun"):
        worker_main(["--config", str(tmp_path / "c.json"), "--out", str(tmp_path)])


def test_comparison_tables_and_the_wire_plot(growth_run):
    from hsplit_nb.distributed import compare_runs, wire_vs_simulated
    from hsplit_nb.plots import plot_wire_bytes

    cfg, out, df, (fed, sim_rows, sim_clients) = growth_run
    table = wire_vs_simulated(wire_bytes(out), sim_clients.assign(method="hsplitlora"))
    assert set(table["kind"]) == set(BYTE_KINDS) and (table["wire"] == table["simulated"]).all()
    assert table["wire"].sum() > 0
    diff = compare_runs(df, sim_rows.assign(method="hsplitlora"))
    assert list(diff["method"]) == ["hsplitlora"] and float(diff.drop(columns="method").max().max()) <= 1e-5
    off = compare_runs(df.assign(val_ppl=df["val_ppl"] + 1.0), sim_rows.assign(method="hsplitlora"))
    assert off.loc[0, "val_ppl"] == pytest.approx(1.0)
    fig = plot_wire_bytes(table)
    assert len(fig.axes[0].patches) == 2 * int(((table["wire"] > 0) | (table["simulated"] > 0)).sum())


def test_the_command_line_writes_the_same_results_csv_as_the_in_process_runner(tmp_path, capsys):
    from hsplit_nb.__main__ import main

    cfg = ExperimentConfig(**{**BASE, "rounds": 1, "local_steps": 2, "final_metrics": True, "eval_mrs": 2},
                           methods=["hsplitlora-no-iwi", "cenlora"])
    cfg.save(tmp_path / "exp.yaml")
    assert main(["run", "--config", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "single")]) == 0
    assert main(["distributed", "--config", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "multi"),
                 "--step-timeout", "60", "--idle-timeout", "120", "--init-timeout", "60"]) == 0
    printed = capsys.readouterr().out
    assert "bytes on the wire per method" in printed and "smashed_up" in printed
    single = pd.read_csv(tmp_path / "single" / "results.csv").drop(columns="wall_time_s")
    multi = pd.read_csv(tmp_path / "multi" / "results.csv").drop(columns="wall_time_s")
    assert list(multi.columns) == list(single.columns)
    pd.testing.assert_frame_equal(multi, single, check_exact=False, atol=1e-5, rtol=0)
    for name in ("clients.csv", "metrics.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "multi" / name), pd.read_csv(tmp_path / "single" / name),
                                      check_exact=False, atol=1e-5, rtol=0)


def _descendants(roots) -> set[int]:
    """Every live process below the given pids, the roots included (the launcher's own walk of /proc)."""
    return set(roots) | launcher_descendants(roots)


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_to_the_launcher_ends_every_process_of_the_run(tmp_path):
    """`python -m hsplit_nb distributed` stopped with SIGTERM mid-run: the launcher ends its agents and their
    workers (checked by pid), exits with the resume hint, and the same command then resumes and finishes."""
    import signal
    import subprocess
    import sys
    import time

    from hsplit_nb.distributed.entry import PROGRESS_FILE

    cfg = ExperimentConfig(**{**BASE, "rounds": 3, "local_steps": 2}, methods=["hsplitlora-no-iwi"])
    cfg.save(tmp_path / "cfg.json")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "hsplit_nb", "distributed", "--config", str(tmp_path / "cfg.json"), "--out", str(out)]
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not ((out / PROGRESS_FILE).is_file() and (out / PROGRESS_FILE).read_text().strip()):
        assert time.time() < deadline and launcher.poll() is None, "the run never finished a round"
        time.sleep(0.5)
    groups = json.loads((out / "pids.json").read_text())["groups"]
    run = _descendants(groups)
    assert len(run) >= 2 * len(groups)  # every agent has its worker
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 130
    assert "interrupted; start the same command again" in launcher.stderr.read()
    time.sleep(1)
    assert [p for p in run if _alive(p)] == []
    assert subprocess.run(cmd, capture_output=True, timeout=400).returncode == 0  # it resumes and finishes
    assert pd.read_csv(out / "results.csv")["round"].max() == 3


@pytest.mark.parametrize("kw,match", [
    ({"port": 70000}, r"port 70000 is not allowed; a TCP port in 1\.\.65535"),
    ({"server_threads": -1}, r"server_threads -1 is not allowed; a whole number of threads, at least 1"),
    ({"client_threads": 0}, r"client_threads 0 is not allowed"),
])
def test_launcher_arguments_out_of_range_are_refused_by_name(tmp_path, kw, match):
    cfg = ExperimentConfig(**BASE, methods=["hsplitlora-no-iwi"])
    with pytest.raises(ValueError, match=match):
        launch(cfg, tmp_path / "run", **{**TIMEOUTS, **kw})
    assert not (tmp_path / "run" / "logs").exists()


def test_a_port_in_use_is_refused_before_any_process_starts(tmp_path):
    import socket

    cfg = ExperimentConfig(**BASE, methods=["hsplitlora-no-iwi"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=rf"port {port} is in use on 127\.0\.0\.1; choose another"):
            launch(cfg, tmp_path / "run", port=port, **TIMEOUTS)


def test_a_hung_client_is_ended_after_its_timeout_and_no_process_of_the_run_outlives_it(tmp_path):
    """c1's worker process is stopped (SIGSTOP) in round 2: after the step timeout the server records it lost and
    either finishes with c0 or stops with an error naming the loss; either way no process of the run is left
    (torchrun starts each worker in a session of its own, so the launcher must end a stopped one itself)."""
    import signal
    import threading
    import time

    cfg = ExperimentConfig(**{**BASE, "rounds": 3, "local_steps": 40}, methods=["hsplitlora-no-iwi"])  # rounds of
    out = tmp_path / "run"                                                                              # seconds
    groups: list[int] = []
    run: set[int] = set()

    def stop_c1():
        progress = out / "progress.jsonl"
        deadline = time.time() + 600
        while time.time() < deadline and not (progress.is_file() and '"round": 1' in progress.read_text()):
            time.sleep(0.02)
        groups.extend(json.loads((out / "pids.json").read_text())["groups"])
        run.update(_descendants(groups))
        for pid in _descendants([groups[2]]) - {groups[2]}:  # rank 2 is c1: its worker, not its agent
            os.kill(pid, signal.SIGSTOP)

    stopper = threading.Thread(target=stop_c1, daemon=True)
    stopper.start()
    try:
        df = launch(cfg, out, **{**TIMEOUTS, "step_timeout": 15})
        rows = df.set_index("round")
        assert "lost: c1" in rows.loc[2, "reasons"] and rows.loc[3, "present"] == 1
    except RuntimeError as exc:
        assert "c1" in str(exc) and "lost" in str(exc), exc
    stopper.join(timeout=5)
    assert len(groups) == 3 and len(run) >= 6
    time.sleep(1)
    assert [p for p in run if _alive(p)] == []
