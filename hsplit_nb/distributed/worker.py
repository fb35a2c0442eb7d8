"""A client process: a generic loop that receives the server's messages and runs them on the same `LocalClient`
the simulation uses, over its own replica of the model, its own data partition and device-side adapters."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from ..clientdata import client_partitions, load_splits
from ..data import Collator, E2EDataset
from ..federation.clients import Client
from ..federation.local import LocalClient
from ..federation.messages import Away, BeginRound, End, Finish, Hello, Open, Step
from ..federation.replica import Replica
from ..io import atomic_write_bytes, torch_bytes
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
        self.indices = client_partitions(cfg, splits)[index]
        self.train_rows = splits.train
        self.method = self.client = None
        self.round = self.step_in_round = 0

    def log(self, text: str) -> None:
        print(f"[{self.name}] {text}", file=sys.stderr, flush=True)

    def run(self) -> None:
        """Every message the server sends, in order, until `End`: each handled by the client's stages (`Open`
        first builds them for the method), the answered ones replied to."""
        while True:
            msg = self.wire.recv_message(SERVER, timeout=self.idle_timeout)
            if isinstance(msg, End):
                self.wire.send_message(SERVER, Hello(self.name, os.getpid()))
                return
            if isinstance(msg, Open):
                self._open(msg.method)
            self._before(msg)
            reply = msg.handle(self.client)
            if msg.answered:
                self.wire.send_message(SERVER, reply)
            if isinstance(msg, Finish) and msg.dump:
                atomic_write_bytes(self.out / "clients" / self.method.name / f"{self.name}.pt",
                                   torch_bytes(self.client.final_state()))

    def _open(self, name: str) -> None:
        """One method's federation: its client stages over a fresh replica of the model."""
        self.method = get_method(name)
        model, tok = load_model(self.cfg.model, device=self.cfg.device)
        self.client = LocalClient(Client(self.name, None, self.indices),
                                  Replica(model, self.cfg.seed, self.cfg.top_rank, self.cfg.alpha),
                                  E2EDataset(self.train_rows, tok, self.cfg.seq_len), Collator(tok.pad_token_id),
                                  self.cfg, self.method.splits, self.method.hetlora_lambda, shares_replica=False)
        self.log(f"method {name}")

    def _before(self, msg) -> None:
        """The process's own bookkeeping: the round and step it is in (for fault injection), absences logged."""
        if isinstance(msg, BeginRound):
            self.round, self.step_in_round = msg.round, 0
        elif isinstance(msg, Away):
            self.log(f"away in round {msg.round}")
        elif isinstance(msg, Step):
            self.step_in_round += 1
            if self.kill_at == (self.round, self.step_in_round):
                self.log(f"killing myself (fault injection) in round {self.round}, step {self.step_in_round}")
                os.kill(os.getpid(), signal.SIGKILL)
