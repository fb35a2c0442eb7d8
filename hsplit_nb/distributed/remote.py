"""The server's side of a client process: `RemoteClient` turns each `ClientProxy` call into messages over
the wire (tensors under the byte kinds the simulation accounts, commands as control messages).

A peer that dies or falls silent raises `PeerLost` in the wire; the proxy records it in `lost` and answers
nothing from then on, so the server sees a value, not an exception.
"""
from __future__ import annotations

import functools

import torch

from ..federation.clients import Client, next_indices
from ..federation.messages import Apply, CatchUp, Configure, Sync
from ..federation.proxy import ClientProxy
from .wire import PeerLost, Wire


def _guarded(fn):
    @functools.wraps(fn)
    def call(self, *args):
        if self.lost:
            return None
        try:
            return fn(self, *args)
        except PeerLost as exc:
            self.lost = str(exc)
            return None
    return call


class RemoteClient(ClientProxy):
    """Client `record.name` in the process of rank `rank`; `record` is the server's shadow of it (its data
    position advances with every step, so checkpoints hold it)."""

    def __init__(self, wire: Wire, rank: int, cfg, stream: int):
        self.wire, self.rank, self.cfg, self.stream = wire, rank, cfg, stream
        self.record: Client | None = None
        self.lost: str | None = None
        self.calibrating = False

    def bind(self, record: Client) -> "RemoteClient":
        """Serve one method's federation (the process and its link live across methods)."""
        self.record = record
        return self

    def _send(self, op: str, **fields) -> None:
        self.wire.send_obj(self.rank, {"op": op, **fields})

    @_guarded
    def open(self, method: str) -> None:
        self._send("method", name=method)
        reply = self.wire.recv_obj(self.rank)
        if reply.get("client") != self.record.name:
            raise RuntimeError(f"rank {self.rank} answered as client {reply.get('client')!r}, "
                               f"expected {self.record.name}")

    @_guarded
    def sync(self, msg: Sync) -> None:
        self._send("sync", split_point=msg.split_point, ranks=msg.ranks, generation=msg.generation, epoch=msg.epoch,
                   pos=msg.pos)
        self.wire.send_tensors(self.rank, msg.weights, "sync")
        self.wire.send_tensors(self.rank, msg.factors, "sync")
        self.wire.send_obj(self.rank, msg.optimizer, "sync")

    @_guarded
    def configure(self, msg: Configure) -> None:
        self._send("configure", split_point=msg.split_point, ranks=msg.ranks, generation=msg.generation,
                   rebuild=msg.rebuild, restarts=msg.restarts, folds=[n for n, _, _ in msg.folds], blocks=len(msg.blocks))
        for _, B, A in msg.folds:
            self.wire.send(self.rank, B, "weights_down")
            self.wire.send(self.rank, A, "weights_down")
        for tensors in msg.blocks:
            self.wire.send_tensors(self.rank, tensors, "weights_down")

    @_guarded
    def away(self, round_: int) -> None:
        self._send("away", round=round_)

    @_guarded
    def catch_up(self, msg: CatchUp) -> None:
        self._send("catch_up", restart=msg.restart, generation=msg.generation)
        self.wire.send_tensors(self.rank, msg.weights, "weights_down")
        self.wire.send_tensors(self.rank, msg.factors, "weights_down")

    @_guarded
    def begin_round(self, round_: int) -> None:
        self._send("round", round=round_)

    @_guarded
    def begin_step(self, calibrate: bool = False) -> None:
        self.calibrating = calibrate
        self._send("step", calibrate=calibrate)

    @_guarded
    def forward(self):
        next_indices(self.record, self.cfg.batch_size, self.cfg.seed, self.stream)  # the shadow's data position
        return tuple(self.wire.recv(self.rank, "smashed_up") for _ in range(3))

    @_guarded
    def backward(self, grad: torch.Tensor) -> torch.Tensor | None:
        self.wire.send(self.rank, grad, "grad_down")
        return self.wire.recv(self.rank, "calibration_up") if self.calibrating else None

    @_guarded
    def unsplit_step(self) -> float:
        next_indices(self.record, self.cfg.batch_size, self.cfg.seed, self.stream)
        return float(self.wire.recv_obj(self.rank))

    @_guarded
    def begin_upload(self) -> None:
        self._send("upload")

    @_guarded
    def upload(self) -> dict[str, torch.Tensor]:
        return self.wire.recv_tensors(self.rank, "adapter_up")

    @_guarded
    def apply(self, msg: Apply) -> None:
        self._send("apply", merges=[n for n, _, _ in msg.merges], restart=msg.restart, generation=msg.generation)
        for _, B, A in msg.merges:
            self.wire.send(self.rank, B, "adapter_down")
            self.wire.send(self.rank, A, "adapter_down")
        self.wire.send_tensors(self.rank, msg.factors, "adapter_down")

    @_guarded
    def optimizer_state(self) -> dict | None:
        """The client's device-side optimizer state, for the server's checkpoint (protocol bytes, `sync`)."""
        self._send("optimizer")
        return self.wire.recv_obj(self.rank, "sync")

    @_guarded
    def finish(self, dump: bool) -> None:
        self._send("finish", dump=dump)

    def end(self) -> None:
        """The launch is over: the process says goodbye and exits."""
        if self.lost:
            return
        try:
            self._send("end")
            self.wire.recv_obj(self.rank, timeout=min(self.wire.timeout, 30.0))
        except (PeerLost, RuntimeError):
            pass
