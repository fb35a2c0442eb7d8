"""Real multi-process split training on torch.distributed: rank 0 is the main server and aggregator,
ranks 1..K are the clients, each in its own process (one torchrun per participant).

The server runs the simulation's own code (`Federation`: planning, IWI, accounting, NAA and the other
aggregators, checkpoints, evaluation) with the client stages replaced by messages: a client keeps its
part of the model, its data and its device-side adapters; smashed data goes up and its gradient comes
back point to point, and the client keeps its autograd graph until the gradient arrives. The server
keeps a shadow of every client's device-side factors, refreshed by the uploads at each round boundary,
so aggregation is the same call on the same values. Adapter restarts are keyed by a seed both sides
know, so restarts cost no bytes. Central methods (cenlora, ft) have no clients and run on the server.

`launch` starts the K+1 torchrun processes on loopback and returns the results; see docs/distributed.md
for several hosts, ports and NCCL.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from peft.tuners.lora import LoraLayer

from .adapters import (
    adapter_names, adapter_parameters, add_adapters, base_weight, merge_delta, read_adapter, restart_adapter,
    restart_seed, write_adapter,
)
from .aggregation import MERGING
from .data import Collator, E2EDataset, partition
from .experiment import _to_bytes
from .federation import Client, FedSettings, Federation, calibration_indices, next_indices, unsplit_step
from .importance import client_scores, scoring, server_scores, side_matrices
from .io import atomic_write_bytes, atomic_write_json
from .methods import get_method
from .split import ClientPart, ServerPart, client_update, nbytes, num_blocks, server_update, unwrap
from .wire import PeerLost, Wire

SERVER = 0
DONE_FILE = "distributed.json"
PROGRESS_FILE = "progress.jsonl"


def _blocks(model):
    hf = unwrap(model)
    return hf.model.layers if hasattr(hf, "model") and hasattr(hf.model, "layers") else hf.transformer.h


def block_tensors(model, layer: int) -> dict[str, torch.Tensor]:
    """The frozen parameters of one block (no adapters), named independently of peft's wrapping."""
    return {f"{layer}.{n.replace('.base_layer', '')}": p.detach() for n, p in _blocks(model)[layer].named_parameters()
            if "lora_" not in n}


def load_block_tensors(model, tensors: dict[str, torch.Tensor]) -> None:
    for key, t in tensors.items():
        layer, name = key.split(".", 1)
        path, attr = name.rsplit(".", 1)
        module = _blocks(model)[int(layer)].get_submodule(path)
        if isinstance(module, LoraLayer):
            module = module.get_base_layer()
        with torch.no_grad():
            getattr(module, attr).copy_(t)


def _factors(model, adapter: str) -> dict[str, torch.Tensor]:
    out = {}
    for n in adapter_names(model, adapter):
        f = read_adapter(model, n, adapter)
        out[f"{n}|A"], out[f"{n}|B"] = f.A, f.B
    return out


def _write_factors(model, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
    for key in tensors:
        if key.endswith("|A"):
            n = key[:-2]
            write_adapter(model, n, tensors[key], tensors[n + "|B"], adapter)


# ---- the server -----------------------------------------------------------------------------------

class RemoteFederation(Federation):
    """The server's federation: every decision and every number as in `Federation`, the client stages
    run in client k's process (rank k + 1)."""

    def __init__(self, *args, wire: Wire, dead: set | None = None, on_lost=None, kill_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.wire, self.kill_at = wire, kill_at
        self.dead = set() if dead is None else dead  # client processes lost earlier in this launch
        for c in self.clients:
            if c.name in self.dead:
                c.present, c.excluded = False, True
        self.step_in_round = 0
        self.notes: list[str] = []
        self.lost: dict[str, str] = {}
        self.on_lost = on_lost

    def rank(self, c: Client) -> int:
        return self.clients.index(c) + 1

    def _lose(self, c: Client, exc: BaseException) -> None:
        """A client that died or timed out leaves for good; the round goes on with those present."""
        c.present, c.excluded = False, True
        self.dead.add(c.name)
        self.lost[c.name] = str(exc)
        self.notes.append(f"lost: {c.name} ({exc})")
        print(f"[server] lost client {c.name}: {exc}", file=sys.stderr, flush=True)
        if self.on_lost is not None:
            self.on_lost(c.name, str(exc))

    def _each(self, clients, fn) -> None:
        """fn(c) for each client, in index order; a PeerLost drops that client and goes on."""
        for c in list(clients):
            if not c.present and c.excluded:
                continue
            try:
                fn(c)
            except PeerLost as exc:
                self._lose(c, exc)

    def _device_ranks(self, c: Client) -> dict[str, int]:
        s = min(c.split_point, self.L)
        return {n: r for n, r in self._adapter_ranks(c).items() if r > 0 and self._layer(n) < s}

    def _hello(self) -> None:
        def greet(c):
            self.wire.send_obj(self.rank(c), {"op": "method", "name": self.method.name})
            reply = self.wire.recv_obj(self.rank(c))
            if reply.get("client") != c.name:
                raise RuntimeError(f"rank {self.rank(c)} answered as client {reply.get('client')!r}, expected {c.name}")
        self._each([c for c in self.clients if not c.excluded], greet)

    # ---- set-up, resume, configuration ---------------------------------------------------------------

    def start(self) -> None:
        if self.method.federated:
            self._hello()
        super().start()

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        for c in self.clients:
            if c.name in self.dead:
                c.present, c.excluded = False, True
        if not self.method.federated:
            return
        self._hello()

        def sync(c):  # a resumed run: the client gets everything it held at the checkpoint
            s = min(c.split_point, self.L)
            touched = {n: base_weight(self.pm, n).detach() for n in sorted(self.touched) if self._layer(n) < s}
            has = self._has_adapter(c.name) and bool(self._device_ranks(c))
            self.wire.send_obj(self.rank(c), {"op": "sync", "split_point": c.split_point, "ranks": self._device_ranks(c),
                                              "generation": self.generation, "epoch": c.epoch, "pos": c.pos})
            self.wire.send_tensors(self.rank(c), touched, "sync")
            self.wire.send_tensors(self.rank(c), {k: v for k, v in _factors(self.pm, c.name).items()
                                                  if self._layer(k.split("|")[0]) < s} if has else {}, "sync")
        self._each([c for c in self.clients if not c.excluded], sync)

    def configure(self, initial: bool = False) -> dict[str, int]:
        before = {c.name: (c.split_point, dict(c.ranks)) for c in self.clients}
        self.merge_log = []
        downloads = super().configure(initial)
        folds, self.merge_log = self.merge_log, None

        def push(c):
            old = before[c.name][0]
            grown = list(range(old, c.split_point)) if not initial and self.method.splits and c.split_point > old else []
            device_folds = [(n, st) for n, st in folds if self._layer(n) < min(old, self.L)]
            rebuild = initial or before[c.name] != (c.split_point, c.ranks)
            self.wire.send_obj(self.rank(c), {
                "op": "configure", "split_point": c.split_point, "ranks": self._device_ranks(c),
                "generation": self.generation, "folded": bool(folds), "rebuild": rebuild,
                "folds": [n for n, _ in device_folds], "blocks": grown})
            for _, st in device_folds:
                self.wire.send(self.rank(c), st.B, "weights_down")
                self.wire.send(self.rank(c), st.A, "weights_down")
            for layer in grown:
                self.wire.send_tensors(self.rank(c), block_tensors(self.pm, layer), "weights_down")
        if self.method.federated:
            self._each(self.present, push)
        return downloads

    def begin_round(self, r: int, events=()) -> dict:
        self.round = r
        try:
            info = super().begin_round(r, events)
        except RuntimeError as exc:
            if self.lost:
                raise RuntimeError(f"round {r}: no client left to train; lost: "
                                   + "; ".join(f"{k} ({v})" for k, v in self.lost.items())) from exc
            raise
        away = [c for c in self.clients if not c.present and c.name not in self.dead]  # keeps their waits short
        for c in away:
            try:
                self.wire.send_obj(self.rank(c), {"op": "away", "round": r})
            except PeerLost as exc:
                self._lose(c, exc)
        return info

    def _catch_up_bytes(self, c: Client) -> int:
        """Also send it: the merged weights of its device-side matrices and, for non-merging
        aggregators, its device-side factors (for merging ones, the restart generation)."""
        b = super()._catch_up_bytes(c)
        s = min(c.split_point, self.L)
        merging = self.method.aggregator in MERGING
        touched = {n: base_weight(self.pm, n).detach() for n in sorted(self.touched) if self._layer(n) < s}
        has = self._has_adapter(c.name) and bool(self._device_ranks(c))
        factors = {k: v for k, v in _factors(self.pm, c.name).items() if self._layer(k.split("|")[0]) < s} \
            if has and not merging else {}

        def send(c):
            self.wire.send_obj(self.rank(c), {"op": "catch_up", "restart": has and merging,
                                              "generation": self.last_reset.get(c.name, self.generation)})
            self.wire.send_tensors(self.rank(c), touched, "weights_down")
            self.wire.send_tensors(self.rank(c), factors, "weights_down")
        self._each([c], send)
        return b

    # ---- a round ------------------------------------------------------------------------------------

    def run_round(self, r: int, weights_down=None) -> dict:
        if self.method.federated:
            self.round, self.step_in_round = r, 0
            self._each(self.present, lambda c: self.wire.send_obj(self.rank(c), {"op": "round", "round": r}))
        rec = super().run_round(r, weights_down)
        rec["reasons"], self.notes = self.notes, []
        return rec

    def _local_step(self, opts, bytes_, losses) -> dict[str, int]:
        present = list(self.present)
        self.step_in_round += 1
        if self.kill_at == (self.round, self.step_in_round):
            print(f"[server] killing myself (fault injection) in round {self.round}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        self._each(present, lambda c: self.wire.send_obj(self.rank(c), {"op": "step"}))  # clients start at once
        step_bytes = {}

        def serve(c):
            k = self.rank(c)
            next_indices(c, self.cfg.batch_size, self.cfg.seed, self.stream(c))  # the shadow of its data position
            if not self.method.splits:
                losses.append(float(self.wire.recv_obj(k)))
                step_bytes[c.name] = 0
                return
            smashed = self.wire.recv(k, "smashed_up").to(self.device)
            mask = self.wire.recv(k, "smashed_up").to(self.device)
            labels = self.wire.recv(k, "smashed_up").to(self.device)
            self._activate(c)
            loss, grad = server_update(ServerPart(self.pm, c.split_point), smashed, mask, labels, opts[c.name][1])
            self.wire.send(k, grad, "grad_down")
            losses.append(loss.item())
            b = {"smashed_up": nbytes(smashed, mask, labels), "grad_down": nbytes(grad)}
            for kind, v in b.items():
                bytes_[c.name][kind] += v
            step_bytes[c.name] = sum(b.values())
        self._each(present, serve)
        return step_bytes

    def calibrate(self) -> None:
        if self.method.federated:
            if not self.method.splits:
                raise ValueError(f"method {self.method.name!r}: IWI calibration needs a split")
            self._each(self.present, lambda c: self.wire.send_obj(self.rank(c), {
                "op": "calibrate", "split_point": self._calibration_split(c), "calibration": self.calibrations}))
        super().calibrate()

    def _client_rngwp(self, c: Client) -> dict[str, float]:
        k, split = self.rank(c), self._calibration_split(c)
        try:
            smashed = self.wire.recv(k, "calibration_up").to(self.device)
            mask = self.wire.recv(k, "calibration_up").to(self.device)
            labels = self.wire.recv(k, "calibration_up").to(self.device)
            if self._has_adapter(c.name):
                self._activate(c)
            srv = side_matrices(self.config, split, "server")
            with scoring(self.pm, [m.name for m in srv]) as weights:
                scores, grad = server_scores(ServerPart(self.pm, split), smashed, mask, labels, srv, weights)
            self.wire.send(k, grad, "calibration_down")
            cli = side_matrices(self.config, split, "client")
            values = self.wire.recv(k, "calibration_up")
        except PeerLost as exc:
            self._lose(c, exc)
            return {}
        scores.update({m.name: float(v) for m, v in zip(cli, values.tolist())})
        self._count_calibration(c, nbytes(smashed, mask, labels) + 8 * len(cli), nbytes(grad))
        return {m.name: scores[m.name] for m in self.matrices}

    def _aggregate(self, bytes_) -> float:
        present = [c for c in self.present if self._has_adapter(c.name) and self._device_ranks(c)]
        self._each(present, lambda c: self.wire.send_obj(self.rank(c), {"op": "upload"}))

        def upload(c):
            _write_factors(self.pm, c.name, self.wire.recv_tensors(self.rank(c), "adapter_up"))
        self._each(present, upload)
        self.merge_log = []
        seconds = super()._aggregate(bytes_)
        merges, self.merge_log = self.merge_log, None
        merging = self.method.aggregator in MERGING

        def apply(c):
            s = min(c.split_point, self.L)
            mine = [(n, st) for n, st in merges if self._layer(n) < s]
            has = self._has_adapter(c.name) and bool(self._device_ranks(c))
            self.wire.send_obj(self.rank(c), {"op": "apply", "merges": [n for n, _ in mine],
                                              "restart": has and merging, "generation": self.generation})
            for _, st in mine:
                self.wire.send(self.rank(c), st.B, "adapter_down")
                self.wire.send(self.rank(c), st.A, "adapter_down")
            factors = {k: v for k, v in _factors(self.pm, c.name).items() if self._layer(k.split("|")[0]) < s} \
                if has and not merging else {}
            self.wire.send_tensors(self.rank(c), factors, "adapter_down")
        if self.method.federated:
            self._each(self.present, apply)
        return seconds

    def finish(self, dump: bool) -> None:
        """End of this method's rounds: live clients may write their final state (for checks)."""
        if self.method.federated:
            self._each([c for c in self.clients if not c.excluded],
                       lambda c: self.wire.send_obj(self.rank(c), {"op": "finish", "dump": dump}))


# ---- a client --------------------------------------------------------------------------------------

class ClientWorker:
    """Client k's process: its data, its part of the model, its device-side adapters; it does what the
    server asks, in order."""

    def __init__(self, cfg, index: int, wire: Wire, out: Path, idle_timeout: float, kill_at=None):
        from .experiment import load_splits
        from .models import load_model

        self.cfg, self.index, self.wire, self.out = cfg, index, wire, Path(out)
        self.name = cfg.client_names()[index]
        self.idle_timeout, self.kill_at = idle_timeout, kill_at
        self._load_model = load_model
        splits = load_splits(cfg)
        self.indices = partition(list(splits.train["mr"]), cfg.num_clients, cfg.partition, cfg.seed,
                                 cfg.dirichlet_alpha, cfg.partition_attribute)[index]
        self.train_rows = splits.train
        self.round = 0
        self.step_in_round = 0

    def log(self, text: str) -> None:
        print(f"[{self.name}] {text}", file=sys.stderr, flush=True)

    # ---- state ---------------------------------------------------------------------------------------

    def _new_method(self, name: str) -> None:
        self.method = get_method(name)
        self.model, self.tok = self._load_model(self.cfg.model, device=self.cfg.device)
        self.data = E2EDataset(self.train_rows, self.tok, self.cfg.seq_len)
        self.collate = Collator(self.tok.pad_token_id)
        self.client = Client(self.name, None, self.indices)
        self.pm = self.model
        self.split = num_blocks(self.model.config)
        self.opt = None

    def _has_adapter(self) -> bool:
        return unwrap(self.pm) is not self.pm and self.name in self.pm.peft_config

    def _restart_all(self, generation: int) -> None:
        for n in adapter_names(self.pm, self.name):
            restart_adapter(self.pm, n, self.name, restart_seed(self.cfg.seed, self.name, n, generation))

    def _rebuild(self, ranks: dict[str, int], generation: int) -> None:
        if self._has_adapter():
            self.pm.delete_adapter(self.name)
        if ranks:
            self.pm = add_adapters(self.pm, ranks, adapter=self.name)
            self._restart_all(generation)

    def _batch(self, positions) -> dict:
        items = [self.data[self.client.indices[i]] for i in positions]
        return {k: v.to(self.cfg.device) for k, v in self.collate(items).items()}

    def _part(self, split: int | None = None) -> ClientPart:
        if self._has_adapter():
            self.pm.base_model.set_adapter([self.name])
        return ClientPart(self.pm, split or self.split)

    # ---- operations ----------------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            msg = self.wire.recv_obj(SERVER, timeout=self.idle_timeout)
            op = msg["op"]
            if op == "end":
                self.wire.send_obj(SERVER, {"bye": self.name})
                return
            getattr(self, f"op_{op}")(msg)

    def op_method(self, msg) -> None:
        self._new_method(msg["name"])
        self.wire.send_obj(SERVER, {"client": self.name, "pid": os.getpid()})
        self.log(f"method {msg['name']}")

    def _merge_received(self, names, kind: str) -> None:
        """Merge B_cat @ A_cat, received for each matrix in `names`, into the frozen weights."""
        for n in names:
            B, A = self.wire.recv(SERVER, kind), self.wire.recv(SERVER, kind)
            merge_delta(self.pm, n, (B @ A).to(self.cfg.device))

    def _load_received_weights(self, kind: str) -> None:
        for n, w in self.wire.recv_tensors(SERVER, kind).items():
            with torch.no_grad():
                base_weight(self.pm, n).copy_(w)

    def op_configure(self, msg) -> None:
        self._merge_received(msg["folds"], "weights_down")
        if msg["folded"] and self._has_adapter():
            self._restart_all(msg["generation"])
        if msg["rebuild"]:
            self._rebuild(msg["ranks"], msg["generation"])
        for _ in msg["blocks"]:
            load_block_tensors(self.pm, self.wire.recv_tensors(SERVER, "weights_down"))
        self.split = msg["split_point"]

    def op_sync(self, msg) -> None:
        self._rebuild(msg["ranks"], msg["generation"])
        self.split, self.client.epoch, self.client.pos = msg["split_point"], msg["epoch"], msg["pos"]
        self._load_received_weights("sync")
        _write_factors(self.pm, self.name, self.wire.recv_tensors(SERVER, "sync"))

    def op_catch_up(self, msg) -> None:
        self._load_received_weights("weights_down")
        if msg["restart"]:
            self._restart_all(msg["generation"])
        _write_factors(self.pm, self.name, self.wire.recv_tensors(SERVER, "weights_down"))

    def op_away(self, msg) -> None:
        self.log(f"away in round {msg['round']}")

    def op_round(self, msg) -> None:
        self.round, self.step_in_round = msg["round"], 0
        params = adapter_parameters(self.pm, self.name) if self._has_adapter() else []
        self.opt = torch.optim.AdamW(params, lr=self.cfg.lr) if params else None
        self.pm.train()

    def op_step(self, msg) -> None:
        self.step_in_round += 1
        if self.kill_at == (self.round, self.step_in_round):
            self.log(f"killing myself (fault injection) in round {self.round}, step {self.step_in_round}")
            os.kill(os.getpid(), signal.SIGKILL)
        batch = self._batch(next_indices(self.client, self.cfg.batch_size, self.cfg.seed, self.index))
        if not self.method.splits:
            if self._has_adapter():
                self.pm.base_model.set_adapter([self.name])
            self.wire.send_obj(SERVER, unsplit_step(self.pm, batch, self.opt, self.method, FedSettings.gamma, self.name))
            return
        smashed = self._part()(batch["input_ids"], batch["attention_mask"])
        for t in (smashed, batch["attention_mask"], batch["labels"]):
            self.wire.send(SERVER, t, "smashed_up")
        grad = self.wire.recv(SERVER, "grad_down").to(smashed.device)  # the graph stays alive until here
        client_update(smashed, grad, self.opt)

    def op_calibrate(self, msg) -> None:
        split = msg["split_point"]
        batch = self._batch(calibration_indices(self.client, self.cfg.batch_size, self.cfg.seed, self.index,
                                                msg["calibration"]))
        cli = side_matrices(self.model.config, split, "client")
        part = self._part(split)
        with scoring(self.pm, [m.name for m in cli]) as weights:
            smashed = part(batch["input_ids"], batch["attention_mask"])
            for t in (smashed, batch["attention_mask"], batch["labels"]):
                self.wire.send(SERVER, t, "calibration_up")
            grad = self.wire.recv(SERVER, "calibration_down").to(smashed.device)
            scores = client_scores(smashed, grad, cli, weights)
        self.wire.send(SERVER, torch.tensor([scores[m.name] for m in cli], dtype=torch.float64), "calibration_up")

    def op_upload(self, msg) -> None:
        self.wire.send_tensors(SERVER, _factors(self.pm, self.name), "adapter_up")

    def op_apply(self, msg) -> None:
        self._merge_received(msg["merges"], "adapter_down")
        if msg["restart"]:
            self._restart_all(msg["generation"])
        _write_factors(self.pm, self.name, self.wire.recv_tensors(SERVER, "adapter_down"))

    def op_finish(self, msg) -> None:
        if not msg["dump"]:
            return
        weights = {m.name: base_weight(self.pm, m.name).detach().clone()
                   for m in side_matrices(self.model.config, self.split, "client")}
        state = {"split_point": self.split, "weights": weights,
                 "adapters": {n: read_adapter(self.pm, n, self.name) for n in adapter_names(self.pm, self.name)}
                 if self._has_adapter() else {}}
        buf = _to_bytes(state)
        atomic_write_bytes(self.out / "clients" / self.method.name / f"{self.name}.pt", buf)


# ---- the worker entry point (one per torchrun) -------------------------------------------------

def _parse_kill(text: str | None):
    if not text:
        return None
    try:
        name, r, s = text.split(":")
        return name, int(r), int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kill must look like c1:2:1 or server:2:1 (who:round:local step), "
                                         f"got {text!r}") from None


def worker_main(argv=None) -> int:
    """What torchrun starts on every rank: `python -m hsplit_nb.distributed --config ... --out ...`."""
    from .experiment import ExperimentConfig, run_experiment

    ap = argparse.ArgumentParser(prog="python -m hsplit_nb.distributed")
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", nargs="+")
    ap.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    ap.add_argument("--step-timeout", type=float, default=300.0)
    ap.add_argument("--idle-timeout", type=float, default=3600.0)
    ap.add_argument("--init-timeout", type=float, default=300.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kill", type=_parse_kill, default=None, help="fault injection: CLIENT:ROUND:STEP")
    ap.add_argument("--dump-clients", action="store_true")
    args = ap.parse_args(argv)
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
    transport = cfg.device if backend == "nccl" else "cpu"
    wire = Wire(args.step_timeout, transport)
    out = Path(args.out)
    try:
        if rank == SERVER:
            return _serve(cfg, args, wire, out, run_experiment)
        index = rank - 1
        kill = args.kill[1:] if args.kill and args.kill[0] == cfg.client_names()[index] else None
        worker = ClientWorker(cfg, index, wire, out, args.idle_timeout, kill)
        try:
            worker.run()
        except PeerLost as exc:
            raise SystemExit(f"client {worker.name}: lost the server ({exc})") from exc
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _serve(cfg, args, wire: Wire, out: Path, run_experiment) -> int:
    """Rank 0: run the experiment with remote clients; write distributed.json (status, wire bytes) at the end."""
    current: dict = {}
    snapshots: list[tuple[str, dict]] = []
    lost: list[dict] = []
    dead: set[str] = set()
    t0 = time.perf_counter()

    def factory(*a, **kw):
        kill = args.kill[1:] if args.kill and args.kill[0] == "server" else None
        fed = RemoteFederation(*a, wire=wire, dead=dead, kill_at=kill, on_lost=lambda n, why: lost.append(
            {"method": fed.method.name, "client": n, "round": getattr(fed, "round", 0), "reason": why}), **kw)
        snapshots.append((fed.method.name, _copy_counts(wire)))
        current["fed"] = fed
        return fed

    def on_round(method, row):
        with open(out / PROGRESS_FILE, "a") as f:
            f.write(json.dumps({"method": method, "round": int(row["round"]), "val_ppl": float(row["val_ppl"]),
                                "present": int(row["present"]), "reasons": row["reasons"],
                                "time": time.time()}) + "\n")
        if row["round"] == cfg.rounds:
            fed = current["fed"]
            if args.dump_clients:
                state = {"touched": {n: base_weight(fed.pm, n).detach().clone() for n in sorted(fed.touched)},
                         "adapters": fed.state()["adapters"]}
                atomic_write_bytes(out / "server" / f"{method}.pt", _to_bytes(state))
            fed.finish(args.dump_clients)

    status, error = "ok", None
    try:
        run_experiment(cfg, args.methods, out, progress=True, on_round=on_round, federation=factory)
    except BaseException as exc:
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        raise
    finally:
        for k in range(1, cfg.num_clients + 1):  # every live client finishes before the done file appears
            if cfg.client_names()[k - 1] in dead:
                continue
            try:
                wire.send_obj(k, {"op": "end"})
                wire.recv_obj(k, timeout=min(wire.timeout, 30.0))
            except (PeerLost, RuntimeError):
                pass
        snapshots.append(("", _copy_counts(wire)))
        per_method = {}
        for (name, before), (_, after) in zip(snapshots, snapshots[1:]):
            per_method[name] = {cfg.client_names()[k - 1]: _diff(after.get(str(k), {}), before.get(str(k), {}))
                                for k in range(1, cfg.num_clients + 1)}
        atomic_write_json(out / DONE_FILE, {
            "status": status, "error": error, "world_size": cfg.num_clients + 1, "backend": dist.get_backend(),
            "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - t0, "lost": lost,
            "wire": per_method})
    return 0


def _copy_counts(wire: Wire) -> dict:
    return json.loads(json.dumps(wire.counts()))


def _diff(after: dict, before: dict) -> dict:
    return {d: {k: v - before.get(d, {}).get(k, 0) for k, v in after.get(d, {}).items()}
            for d in ("sent", "received")}


# ---- the launcher ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wire_bytes(out) -> pd.DataFrame:
    """Bytes that crossed the wire per method, client and kind, from the server's counters
    (`*_up` received from the client, `*_down` sent to it; control, sync and header separately)."""
    done = json.loads((Path(out) / DONE_FILE).read_text())
    rows = []
    for method, clients in done["wire"].items():
        for client, c in clients.items():
            row = {"method": method, "client": client}
            for direction, counts in c.items():
                for kind, v in counts.items():
                    if kind.endswith("_up") and direction == "received" or kind.endswith("_down") and direction == "sent":
                        row[kind] = v
                    elif not kind.endswith(("_up", "_down")):
                        row[f"{kind}_{'down' if direction == 'sent' else 'up'}"] = v
            rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["method", "client"]).fillna(0)


def wire_vs_simulated(wire: pd.DataFrame, clients: pd.DataFrame) -> pd.DataFrame:
    """Per method and kind: bytes counted on the wire and bytes the simulation accounted (clients.csv of
    the same config), summed over clients and rounds."""
    from .federation import BYTE_KINDS

    real = wire.groupby("method")[[k for k in BYTE_KINDS if k in wire]].sum().stack()
    sim = clients.groupby("method")[list(BYTE_KINDS)].sum().stack()
    table = pd.DataFrame({"wire": real, "simulated": sim}).fillna(0).astype("int64")
    table.index.names = ["method", "kind"]
    return table.reset_index()


def compare_runs(real: pd.DataFrame, simulated: pd.DataFrame,
                 columns=("val_ppl", "train_loss", "sim_time_s", "bytes_up", "bytes_down")) -> pd.DataFrame:
    """Largest absolute difference per method and column between two results tables (same config)."""
    keys = ["method", "round"]
    both = real.set_index(keys)[list(columns)].join(simulated.set_index(keys)[list(columns)], rsuffix="_sim")
    diff = pd.DataFrame({c: (both[c] - both[f"{c}_sim"]).abs() for c in columns})
    return diff.groupby("method").max().reset_index()


def launch(config, out, methods=None, *, step_timeout: float = 300.0, idle_timeout: float = 3600.0,
           init_timeout: float = 300.0, server_threads: int | None = None, client_threads: int | None = 1,
           port: int | None = None, progress: bool = True, kill: str | None = None, dump_clients: bool = False,
           timeout: float | None = None) -> pd.DataFrame:
    """Run `config` (an ExperimentConfig or a JSON/YAML path) with 1 server and K client processes, each
    under its own torchrun on loopback; returns results.csv as a DataFrame (attrs: wire bytes, lost
    clients). Rerunning with the same `out` resumes from the checkpoints."""
    from tqdm.auto import tqdm

    from .experiment import ExperimentConfig

    cfg = config if isinstance(config, ExperimentConfig) else ExperimentConfig.load(config)
    if methods is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, methods=list(methods))
    cfg.validate()
    for name, value in (("step_timeout", step_timeout), ("idle_timeout", idle_timeout), ("init_timeout", init_timeout)):
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if kill is not None:
        try:
            who = _parse_kill(kill)[0]
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc)) from None
        if who not in ["server"] + cfg.client_names():
            raise ValueError(f"kill: {who!r} is not a participant; choose server or one of {cfg.client_names()}")
    if str(cfg.model) == "smollm2-135m":
        from .models import ensure_smollm2_cache

        ensure_smollm2_cache()  # once here, not K + 1 times at once
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "launch-config.json"
    cfg.save(cfg_path)
    (out / DONE_FILE).unlink(missing_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    world = cfg.num_clients + 1
    port = port or free_port()
    procs = []
    for rank in range(world):
        threads = (server_threads or os.cpu_count()) if rank == SERVER else client_threads
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={world}", "--nproc-per-node=1",
               f"--node-rank={rank}", "--rdzv-backend=static", "--master-addr=127.0.0.1", f"--master-port={port}",
               "--max-restarts=0", "-m", "hsplit_nb.distributed", "--config", str(cfg_path), "--out", str(out),
               "--step-timeout", str(step_timeout), "--idle-timeout", str(idle_timeout),
               "--init-timeout", str(init_timeout)]
        if threads:
            cmd += ["--threads", str(threads)]
        if kill:
            cmd += ["--kill", kill]
        if dump_clients:
            cmd += ["--dump-clients"]
        log = open(out / "logs" / f"rank{rank}.log", "w")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads or 1), "PYTHONUNBUFFERED": "1"}
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True), log))
    bar = tqdm(total=len(cfg.methods) * cfg.rounds, desc=f"distributed ({world} processes)", disable=not progress)
    seen = len((out / PROGRESS_FILE).read_text().splitlines()) if (out / PROGRESS_FILE).is_file() else 0
    start = time.time()
    try:
        while True:
            seen = _progress(out, bar, seen)
            if (out / DONE_FILE).is_file():
                break
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


def _stop(procs) -> None:
    """Stop every torchrun agent still running. After a fault the agents wait on an exit barrier for the
    dead one (300 s, inside a C++ call that defers SIGTERM), so SIGKILL follows after 2 s."""
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


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


if __name__ == "__main__":
    sys.exit(worker_main())
