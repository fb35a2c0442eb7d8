"""A client process: a thin loop that receives the server's calls and runs them on the same `LocalClient`
the simulation uses, over its own replica of the model, its own data partition and device-side adapters."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from ..data import Collator, E2EDataset, partition
from ..experiment import _to_bytes, load_splits
from ..federation.clients import Client
from ..federation.messages import Apply, CatchUp, Configure, Sync
from ..federation.proxy import LocalClient
from ..federation.replica import Replica
from ..io import atomic_write_bytes
from ..methods import get_method
from ..models import load_model
from .wire import Wire

SERVER = 0


class ClientProcess:
    """Client k's process: it does what the server asks, in order, until told to end."""

    def __init__(self, cfg, index: int, wire: Wire, out: Path, idle_timeout: float, kill_at=None):
        self.cfg, self.index, self.wire, self.out = cfg, index, wire, Path(out)
        self.name = cfg.client_names()[index]
        self.idle_timeout, self.kill_at = idle_timeout, kill_at
        splits = load_splits(cfg)
        self.indices = partition(list(splits.train["mr"]), cfg.num_clients, cfg.partition, cfg.seed,
                                 cfg.dirichlet_alpha, cfg.partition_attribute)[index]
        self.train_rows = splits.train
        self.method = self.client = None
        self.round = self.step_in_round = 0

    def log(self, text: str) -> None:
        print(f"[{self.name}] {text}", file=sys.stderr, flush=True)

    def run(self) -> None:
        while True:
            msg = self.wire.recv_obj(SERVER, timeout=self.idle_timeout)
            op = msg.pop("op")
            if op == "end":
                self.wire.send_obj(SERVER, {"bye": self.name})
                return
            getattr(self, f"op_{op}")(**msg)

    def _tensors(self, kind: str) -> dict:
        return self.wire.recv_tensors(SERVER, kind)

    def _pairs(self, names, kind: str) -> list:
        return [(n, self.wire.recv(SERVER, kind), self.wire.recv(SERVER, kind)) for n in names]

    # ---- one method's federation ----------------------------------------------------------------------

    def op_method(self, name: str) -> None:
        self.method = get_method(name)
        model, tok = load_model(self.cfg.model, device=self.cfg.device)
        self.client = LocalClient(Client(self.name, None, self.indices), Replica(model, self.cfg.seed, self.cfg.top_rank, self.cfg.alpha),
                                  E2EDataset(self.train_rows, tok, self.cfg.seq_len), Collator(tok.pad_token_id),
                                  self.cfg, self.index, self.method.hetlora_lambda, shares_replica=False)
        self.wire.send_obj(SERVER, {"client": self.name, "pid": os.getpid()})
        self.log(f"method {name}")

    def op_sync(self, **fields) -> None:
        weights, factors = self._tensors("sync"), self._tensors("sync")
        self.client.sync(Sync(**fields, weights=weights, factors=factors,
                              optimizer=self.wire.recv_obj(SERVER, "sync")))

    def op_optimizer(self) -> None:
        self.wire.send_obj(SERVER, self.client.optimizer_state(), "sync")

    def op_configure(self, folds, blocks, **fields) -> None:
        folds = self._pairs(folds, "weights_down")
        self.client.configure(Configure(**fields, folds=folds,
                                        blocks=[self._tensors("weights_down") for _ in range(blocks)]))

    def op_catch_up(self, **fields) -> None:
        self.client.catch_up(CatchUp(**fields, weights=self._tensors("weights_down"),
                                     factors=self._tensors("weights_down")))

    def op_away(self, round) -> None:  # noqa: A002  (the message's field)
        self.log(f"away in round {round}")

    def op_round(self, round) -> None:  # noqa: A002
        self.round, self.step_in_round = round, 0
        self.client.begin_round(round)

    def op_step(self, calibrate: bool = False) -> None:
        self.step_in_round += 1
        if self.kill_at == (self.round, self.step_in_round):
            self.log(f"killing myself (fault injection) in round {self.round}, step {self.step_in_round}")
            os.kill(os.getpid(), signal.SIGKILL)
        if not self.method.splits:
            self.wire.send_obj(SERVER, self.client.unsplit_step())
            return
        self.client.begin_step(calibrate)
        for t in self.client.forward():
            self.wire.send(SERVER, t, "smashed_up")
        scores = self.client.backward(self.wire.recv(SERVER, "grad_down"))  # the graph stays alive until here
        if calibrate:
            self.wire.send(SERVER, scores, "calibration_up")

    def op_upload(self) -> None:
        self.wire.send_tensors(SERVER, self.client.upload(), "adapter_up")

    def op_apply(self, merges, **fields) -> None:
        merges = self._pairs(merges, "adapter_down")
        self.client.apply(Apply(**fields, merges=merges, factors=self._tensors("adapter_down")))

    def op_finish(self, dump: bool) -> None:
        if dump:
            atomic_write_bytes(self.out / "clients" / self.method.name / f"{self.name}.pt",
                               _to_bytes(self.client.final_state()))
