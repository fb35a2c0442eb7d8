"""The launcher: one torchrun per participant (1 server + K clients) on loopback, progress from the
server's progress file, results.csv with the wire bytes and the lost clients; see docs/distributed.md for
several hosts, ports and NCCL."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..config import ExperimentConfig
from ..io import atomic_write_json
from ..runfolder import RunFolder
from .entry import DONE_FILE, PROGRESS_FILE, parse_kill
from .report import wire_bytes
from .worker import SERVER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(cfg: ExperimentConfig, kill, timeouts: dict, port=None, threads: dict | None = None) -> None:
    cfg.validate()
    for name, value in timeouts.items():
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    for name, value in (threads or {}).items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} {value!r} is not allowed; a whole number of threads, at least 1")
    if port is not None:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"port {port!r} is not allowed; a TCP port in 1..65535 (or none: a free one is chosen)")
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                raise ValueError(f"port {port} is in use on 127.0.0.1; choose another, or none: a free one is "
                                 "chosen") from None
    if kill is not None:
        try:
            who = parse_kill(kill)[0]
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc)) from None
        if who not in ["server"] + cfg.client_names():
            raise ValueError(f"kill: {who!r} is not a participant; choose server or one of {cfg.client_names()}")


@contextlib.contextmanager
def _ends_on_signals():
    """SIGTERM and SIGHUP end the launcher as Ctrl-C does, so that its `finally` stops every process of the run
    (by default they would end the launcher alone and leave its agents training)."""
    def end(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, end) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _start(cfg_path: Path, out: Path, world: int, port: int, extra: list[str], server_threads, client_threads):
    """One torchrun agent per participant, each in its own session (so it can be stopped with its children); their
    process groups are written to <out>/pids.json (what a check after a stop looks for)."""
    procs = []
    for rank in range(world):
        threads = (server_threads or os.cpu_count()) if rank == SERVER else client_threads
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={world}", "--nproc-per-node=1",
               f"--node-rank={rank}", "--rdzv-backend=static", "--master-addr=127.0.0.1", f"--master-port={port}",
               "--max-restarts=0", "-m", "hsplit_nb.distributed", "--config", str(cfg_path), "--out", str(out),
               *extra] + (["--threads", str(threads)] if threads else [])
        log = open(out / "logs" / f"rank{rank}.log", "w")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads or 1), "PYTHONUNBUFFERED": "1"}
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True), log))
        atomic_write_json(out / "pids.json", {"launcher": os.getpid(), "groups": [p.pid for p, _ in procs]})
    return procs


def _follow(out: Path, procs, bar, timeout: float | None) -> None:
    """Show progress until the server's done file appears; an early server exit or the timeout is an error."""
    seen = len((out / PROGRESS_FILE).read_text().splitlines()) if (out / PROGRESS_FILE).is_file() else 0
    start = time.time()
    while not (out / DONE_FILE).is_file():
        seen = _progress(out, bar, seen)
        if procs[SERVER][0].poll() is not None:
            time.sleep(1.0)  # the done file is written just before the worker exits
            if (out / DONE_FILE).is_file():
                break
            raise RuntimeError(f"the server process exited with {procs[SERVER][0].returncode} before finishing; "
                               f"log tail:\n{_tail(out / 'logs' / 'rank0.log')}")
        if timeout is not None and time.time() - start > timeout:
            raise TimeoutError(f"distributed run still going after {timeout} s; logs in {out / 'logs'}")
        time.sleep(0.5)
    _progress(out, bar, seen)
    grace = time.time() + 3  # clients have said goodbye; after a fault their agents wait on an exit barrier
    while time.time() < grace and any(p.poll() is None for p, _ in procs):
        time.sleep(0.2)


def launch(config, out, methods=None, *, step_timeout: float = 300.0, idle_timeout: float = 3600.0,
           init_timeout: float = 300.0, server_threads: int | None = None, client_threads: int | None = 1,
           port: int | None = None, progress: bool = True, kill: str | None = None, dump_clients: bool = False,
           timeout: float | None = None) -> pd.DataFrame:
    """Run `config` (an ExperimentConfig or a JSON/YAML path) with 1 server and K client processes, each
    under its own torchrun on loopback; returns results.csv as a DataFrame (attrs: wire bytes, lost
    clients). Rerunning with the same `out` resumes from the checkpoints."""
    cfg = config if isinstance(config, ExperimentConfig) else ExperimentConfig.load(config)
    if methods is not None:
        cfg = cfg.replace(methods=list(methods))
    _check(cfg, kill, {"step_timeout": step_timeout, "idle_timeout": idle_timeout, "init_timeout": init_timeout},
           port, {"server_threads": server_threads, "client_threads": client_threads})
    RunFolder(out, cfg).check()  # before any process starts: a folder of another setting is refused here
    if str(cfg.model) == "smollm2-135m":
        from ..models import ensure_smollm2_cache

        ensure_smollm2_cache()  # once here, not K + 1 times at once
    out = Path(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    cfg_path = out / "launch-config.json"
    cfg.save(cfg_path)
    (out / DONE_FILE).unlink(missing_ok=True)
    extra = ["--step-timeout", str(step_timeout), "--idle-timeout", str(idle_timeout), "--init-timeout",
             str(init_timeout)] + (["--kill", kill] if kill else []) + (["--dump-clients"] if dump_clients else [])
    world = cfg.num_clients + 1
    bar = tqdm(total=len(cfg.methods) * cfg.rounds, desc=f"distributed ({world} processes)", disable=not progress)
    with _ends_on_signals():
        procs = _start(cfg_path, out, world, port or free_port(), extra, server_threads, client_threads)
        try:
            _follow(out, procs, bar, timeout)
        finally:
            bar.close()
            _stop(procs)
    done = json.loads((out / DONE_FILE).read_text())
    if done["status"] != "ok":
        raise RuntimeError(f"the distributed run failed: {done['error']}; log tail:\n{_tail(out / 'logs' / 'rank0.log')}")
    df = pd.read_csv(out / "results.csv")
    df["reasons"] = df["reasons"].astype(object).where(df["reasons"].notna(), "")  # an empty reason reads as NaN
    df.attrs["wire"] = wire_bytes(out)
    df.attrs["lost"] = pd.DataFrame(done["lost"])
    return df


def _progress(out: Path, bar, seen: int) -> int:
    path = out / PROGRESS_FILE
    if not path.is_file():
        return seen
    lines = path.read_text().splitlines()
    for line in lines[seen:]:
        rec = json.loads(line)
        bar.update(1)
        bar.set_postfix(method=rec["method"], round=rec["round"], ppl=f"{rec['val_ppl']:.3f}", present=rec["present"])
    return len(lines)


def _descendants(pids) -> set[int]:
    """Every process below the given ones (Linux /proc; empty elsewhere)."""
    parent = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            parent[int(entry)] = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = set(), list(pids)
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in found]
        found |= set(kids)
        frontier += kids
    return found


def _stop(procs) -> None:
    """Stop every torchrun agent still running. After a fault the agents wait on an exit barrier for the
    dead one (300 s, inside a C++ call that defers SIGTERM), so SIGKILL follows after 2 s. torchrun starts each
    worker in a session of its own, so a worker that cannot act on its agent's SIGTERM (a stopped, hung client)
    would outlive it: whatever is left below the agents is continued and killed."""
    workers = _descendants([p.pid for p, _ in procs])
    for p, _ in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.time() + 2
    for p, log in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        log.close()
    for pid in workers:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                break


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


