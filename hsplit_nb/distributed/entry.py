"""What torchrun starts on every rank: rank 0 runs the experiment's main server with remote clients, ranks
1..K run a client process each. `python -m hsplit_nb.distributed --config ... --out ...`."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ExperimentConfig
from ..experiment import run_experiment
from ..io import atomic_write_bytes, atomic_write_json, torch_bytes
from .remote import RemoteClient
from .wire import PeerLost, Wire
from .worker import SERVER, ClientProcess

DONE_FILE = "distributed.json"
PROGRESS_FILE = "progress.jsonl"


def parse_kill(text: str | None):
    if not text:
        return None
    try:
        name, r, s = text.split(":")
        return name, int(r), int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kill must look like c1:2:1 or server:2:1 (who:round:local step), "
                                         f"got {text!r}") from None


def _arguments(argv):
    ap = argparse.ArgumentParser(prog="python -m hsplit_nb.distributed")
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", nargs="+")
    ap.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    ap.add_argument("--step-timeout", type=float, default=300.0)
    ap.add_argument("--idle-timeout", type=float, default=3600.0)
    ap.add_argument("--init-timeout", type=float, default=300.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kill", type=parse_kill, default=None, help="fault injection: CLIENT:ROUND:STEP")
    ap.add_argument("--dump-clients", action="store_true")
    return ap.parse_args(argv)


def worker_main(argv=None) -> int:
    args = _arguments(argv)
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise SystemExit(f"{key} is not set: start this module with torchrun (see docs/distributed.md)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = ExperimentConfig.load(args.config)
    if world != cfg.num_clients + 1:
        raise SystemExit(f"world size {world} does not fit the config: 1 server + {cfg.num_clients} clients")
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = args.backend if args.backend != "auto" else ("nccl" if str(cfg.device).startswith("cuda") else "gloo")
    dist.init_process_group(backend, timeout=timedelta(seconds=args.init_timeout))
    wire = Wire(args.step_timeout, cfg.device if backend == "nccl" else "cpu")
    try:
        if rank == SERVER:
            return serve(cfg, args, wire, Path(args.out))
        index = rank - 1
        kill = args.kill[1:] if args.kill and args.kill[0] == cfg.client_names()[index] else None
        process = ClientProcess(cfg, index, wire, Path(args.out), args.idle_timeout, kill)
        try:
            process.run()
        except PeerLost as exc:
            raise SystemExit(f"client {process.name}: lost the server ({exc})") from exc
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _ServerSide:
    """Rank 0's view of one launch: the links to the client processes (they outlive each method), the server
    of the method running now, wire counts per method and the clients lost."""

    def __init__(self, cfg, args, wire: Wire, out: Path):
        self.cfg, self.args, self.wire, self.out = cfg, args, wire, out
        self.links = {n: RemoteClient(wire, k + 1) for k, n in enumerate(cfg.client_names())}
        self.server = None
        self.snapshots: list[tuple[str, dict]] = []
        self.lost: list[dict] = []

    def transport(self, server) -> dict:
        """Remote clients for a method's main server (central methods never ask: they run here)."""
        self.server = server
        if self.args.kill and self.args.kill[0] == "server":
            server.on_step = self._kill_hook(self.args.kill[1:])
        self.snapshots.append((server.method.name, _copy_counts(self.wire)))
        return {c.name: self.links[c.name] for c in server.clients}

    @staticmethod
    def _kill_hook(at):
        def hook(round_, step):
            if (round_, step) == at:
                print(f"[server] killing myself (fault injection) in round {round_}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        return hook

    def on_lost(self, method: str, client: str, why: str) -> None:
        self.lost.append({"method": method, "client": client, "round": self.server.round, "reason": why})

    def on_round(self, method: str, row: dict) -> None:
        with open(self.out / PROGRESS_FILE, "a") as f:
            f.write(json.dumps({"method": method, "round": int(row["round"]), "val_ppl": float(row["val_ppl"]),
                                "present": int(row["present"]), "reasons": row["reasons"],
                                "time": time.time()}) + "\n")
        server = self.server
        if row["round"] != self.cfg.rounds or server is None or server.method.name != method:
            return
        if self.args.dump_clients:
            state = {"touched": {n: w.clone() for n, w in server.replica.weights(sorted(server.touched)).items()},
                     "adapters": server.state()["adapters"]}
            atomic_write_bytes(self.out / "server" / f"{method}.pt", torch_bytes(state))
        server.finish(self.args.dump_clients)

    def wire_per_method(self) -> dict:
        snapshots = self.snapshots + [("", _copy_counts(self.wire))]
        names = self.cfg.client_names()
        return {name: {names[k - 1]: _diff(after.get(str(k), {}), before.get(str(k), {}))
                       for k in range(1, len(names) + 1)}
                for (name, before), (_, after) in zip(snapshots, snapshots[1:])}


def serve(cfg, args, wire: Wire, out: Path) -> int:
    """Rank 0: run the experiment with remote clients; write distributed.json (status, wire bytes) at the end."""
    side = _ServerSide(cfg, args, wire, out)
    t0 = time.perf_counter()
    status, error = "ok", None
    try:
        run_experiment(cfg, args.methods, out, progress=True, on_round=side.on_round, transport=side.transport,
                       on_lost=side.on_lost)
    except BaseException as exc:
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        raise
    finally:
        for link in side.links.values():  # every live client finishes before the done file appears
            link.end()
        atomic_write_json(out / DONE_FILE, {
            "status": status, "error": error, "world_size": cfg.num_clients + 1, "backend": dist.get_backend(),
            "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - t0, "lost": side.lost,
            "wire": side.wire_per_method()})
    return 0


def _copy_counts(wire: Wire) -> dict:
    return json.loads(json.dumps(wire.counts()))


def _diff(after: dict, before: dict) -> dict:
    return {d: {k: v - before.get(d, {}).get(k, 0) for k, v in after.get(d, {}).items()}
            for d in ("sent", "received")}
