"""The one interface through which the main server talks to a client, and its in-process implementation.

As Flower's ClientProxy, the server calls the same methods whatever the transport: `LocalClient` runs the
client's stages in this process; `distributed.remote.RemoteClient` sends the same calls as messages to a
client process, which runs them on its own `LocalClient`. Calls come in pairs where a remote client can
work while the server talks to the others (`begin_step` to all, then `forward`/`backward` one by one).
A client that is lost (its process died or fell silent) sets `lost` to the reason and answers nothing
more; the server reads that value and leaves the client out, it does not see an exception.
"""
from __future__ import annotations

import contextlib

import torch

from ..adapters import adapter_names, adapter_parameters, base_weight, read_adapter
from ..aggregation import hetlora_regulariser
from ..importance import riding, side_matrices
from ..split import ClientPart, client_update, unwrap
from .clients import Client, next_indices
from .messages import Apply, CatchUp, Configure, Sync
from .optimizers import factor_params
from .replica import Replica


class ClientProxy:
    """What the main server may ask of a client."""
    lost: str | None = None

    def open(self, method: str) -> None: ...
    def sync(self, msg: Sync) -> None: ...
    def configure(self, msg: Configure) -> None: ...
    def away(self, round_: int) -> None: ...
    def catch_up(self, msg: CatchUp) -> None: ...
    def begin_round(self, round_: int) -> None: ...
    def begin_step(self, calibrate: bool = False) -> None: ...
    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
    def backward(self, grad: torch.Tensor) -> torch.Tensor | None: ...
    def unsplit_step(self) -> float: ...
    def begin_upload(self) -> None: ...
    def upload(self) -> dict[str, torch.Tensor]: ...
    def apply(self, msg: Apply) -> None: ...
    def optimizer_state(self) -> dict | None: ...
    def finish(self, dump: bool) -> None: ...


def unsplit_step(model, batch: dict, opt, hetlora_lambda: float, gamma: float, adapter: str) -> float:
    """A no-split method's local step on the whole model (HetLoRA adds its self-pruning term); returns the
    loss without the regulariser."""
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    total = loss
    if hetlora_lambda:
        total = loss + hetlora_lambda * hetlora_regulariser(model, gamma, adapter=adapter)
    total.backward()
    if opt is not None:
        opt.step()
    return loss.item()


class LocalClient(ClientProxy):
    """A client's stages in this process: its data, its part of the model, its device-side optimizer.

    The client's forward goes through its own adapter only. With `shares_replica` (the simulation) the replica
    is the server's: every decision of the server has already reached the weights and adapters, so the boundary
    messages leave them alone. Otherwise (a client process) they are applied here. Either way the client keeps
    its device-side optimizer across rounds and drops it when its adapter restarts or is rebuilt.
    """

    def __init__(self, record: Client, replica: Replica, data, collate, cfg, stream: int, hetlora_lambda: float = 0.0,
                 shares_replica: bool = True):
        self.record, self.replica, self.data, self.collate, self.cfg = record, replica, data, collate, cfg
        self.stream, self.hetlora_lambda, self.shares_replica = stream, hetlora_lambda, shares_replica
        self.opt = None
        self._graph = None  # the smashed data of the step in flight, with its autograd graph
        self._calibrate = False  # the step in flight calibrates (IWI rides on it)
        self._scores: dict | None = None
        self._scoring = contextlib.ExitStack()

    @property
    def name(self) -> str:
        return self.record.name

    def _own(self):
        return self.replica.using([self.name])

    def _batch(self, positions) -> dict:
        items = [self.data[self.record.indices[i]] for i in positions]
        return {k: v.to(self.cfg.device) for k, v in self.collate(items).items()}

    # ---- boundary messages (weights and adapters applied only to a replica of the client's own) -------

    def configure(self, msg: Configure) -> None:
        if msg.rebuild:
            self.opt = None  # a rebuilt adapter starts with fresh optimizer state
        self._forget(msg.restarts)
        if self.shares_replica:
            return
        for n, B, A in msg.folds:
            self.replica.merge(n, (B @ A).to(self.cfg.device))
        if not msg.rebuild:
            for n in msg.restarts:
                self.replica.restart(n, self.name, msg.generation)
        if msg.rebuild:
            self.replica.replace_adapter(self.name, msg.ranks, msg.generation)
        for tensors in msg.blocks:
            self.replica.load_block_tensors(tensors)
        self.record.split_point, self.record.ranks = msg.split_point, dict(msg.ranks)

    def _forget(self, matrices) -> None:
        """The device optimizer's state of restarted matrices starts afresh; the others' is kept."""
        if self.opt is None or not matrices:
            return
        for n in matrices:
            for p in factor_params(self.replica.pm, n, self.name):
                self.opt.state.pop(p, None)

    def sync(self, msg: Sync) -> None:
        if not self.shares_replica:
            self.replica.replace_adapter(self.name, msg.ranks, msg.generation)
            self.record.split_point, self.record.ranks = msg.split_point, dict(msg.ranks)
            self.record.epoch, self.record.pos = msg.epoch, msg.pos
            self.replica.load_weights(msg.weights)
            self.replica.write_factors(self.name, msg.factors)
        self.opt = None
        if msg.optimizer is not None:
            self._new_optimizer()
            self.opt.load_state_dict(msg.optimizer)

    def catch_up(self, msg: CatchUp) -> None:
        if msg.restart:
            self.opt = None
        if self.shares_replica:
            return
        self.replica.load_weights(msg.weights)
        if msg.restart:
            self.replica.restart_all(self.name, msg.generation)
        self.replica.write_factors(self.name, msg.factors)

    def apply(self, msg: Apply) -> None:
        if msg.restart:
            self.opt = None
        if self.shares_replica:
            return
        for n, B, A in msg.merges:
            self.replica.merge(n, (B @ A).to(self.cfg.device))
        if msg.restart:
            self.replica.restart_all(self.name, msg.generation)
        self.replica.write_factors(self.name, msg.factors)

    def optimizer_state(self) -> dict | None:
        """The device-side optimizer's state, for the server's checkpoint (None: starts fresh next round)."""
        return None if self.opt is None else self.opt.state_dict()

    # ---- a round -----------------------------------------------------------------------------------

    def _new_optimizer(self) -> None:
        has = self.replica.has_adapter(self.name)
        params = adapter_parameters(self.replica.pm, self.name, self.record.device_layers) if has else []
        self.opt = torch.optim.AdamW(params, lr=self.cfg.lr) if params else None

    def begin_round(self, round_: int) -> None:
        """AdamW over the client's device-side adapters: kept from the last round unless they restarted."""
        if self.opt is None:
            self._new_optimizer()
        self.replica.pm.train()

    def _next_batch(self) -> dict:
        return self._batch(next_indices(self.record, self.cfg.batch_size, self.cfg.seed, self.stream))

    def begin_step(self, calibrate: bool = False) -> None:
        """A local step begins; with `calibrate`, its backward also scores the device side (RNGWP)."""
        self._calibrate = calibrate

    def forward(self):
        """The device part's forward on the next mini-batch; the graph stays until `backward`. In a calibrating
        step, hooks on the device side's frozen layers keep their inputs for the backward."""
        batch = self._next_batch()
        part = ClientPart(self.replica.pm, self.record.split_point)
        self._scores = None
        if self._calibrate:
            self._cli = side_matrices(unwrap(self.replica.pm).config, self.record.split_point, "client")
            self._scores = self._scoring.enter_context(riding(self.replica.pm, self._cli, part.embeddings))
        with self._own():
            self._graph = part(batch["input_ids"], batch["attention_mask"])
        return self._graph.detach(), batch["attention_mask"], batch["labels"]

    def backward(self, grad: torch.Tensor) -> torch.Tensor | None:
        """Backward from the smashed data's gradient and the device optimizer's step; in a calibrating step, the
        device side's RNGWP scores (float64, one per device-side matrix), else None."""
        smashed, self._graph = self._graph, None
        try:
            client_update(smashed, grad.to(smashed.device), self.opt)
        finally:
            self._scoring.close()
        if self._scores is None:
            return None
        return torch.tensor([self._scores[m.name] for m in self._cli], dtype=torch.float64)

    def unsplit_step(self) -> float:
        batch = self._next_batch()
        with self._own():
            return unsplit_step(self.replica.pm, batch, self.opt, self.hetlora_lambda, self.cfg.gamma, self.name)

    # ---- aggregation -------------------------------------------------------------------------------

    def upload(self) -> dict[str, torch.Tensor]:
        return self.replica.factors(self.name, self.record.device_layers)

    def final_state(self) -> dict:
        """The client's device side: split point, frozen weights and adapters (for checks after a run)."""
        pm, s = self.replica.pm, self.record.split_point
        has = self.replica.has_adapter(self.name)
        return {"split_point": s,
                "weights": {m.name: base_weight(pm, m.name).detach().clone()
                            for m in side_matrices(unwrap(pm).config, s, "client")},
                "adapters": {n: read_adapter(pm, n, self.name) for n in adapter_names(pm, self.name)} if has else {}}
