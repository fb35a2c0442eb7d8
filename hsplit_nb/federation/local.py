"""A client's stages in this process: what the in-process simulation runs for every client, and what each
client process runs on its own replica. One method per message of the vocabulary (`messages.ClientStages`)."""
from __future__ import annotations

import contextlib
import os

import torch

from ..adapters import adapter_names, adapter_parameters, base_weight, read_adapter
from ..aggregation import hetlora_regulariser
from ..importance import riding, side_matrices
from ..split import ClientPart, client_update, unwrap
from .clients import Client
from .messages import (
    Apply, Away, Backward, BeginRound, CatchUp, ClientStages, Configure, Factors, Finish, Hello, Loss, Open,
    Optimizer, OptimizerState, Scores, Smashed, Step, Sync, Upload,
)
from .optimizers import factor_params
from .replica import Replica


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


class LocalClient(ClientStages):
    """A client's stages: its data, its part of the model, its device-side optimizer.

    The client's forward goes through its own adapter only. With `shares_replica` (the simulation) the replica
    is the server's: every decision of the server has already reached the weights and adapters, so the boundary
    messages leave them alone. Otherwise (a client process) they are applied here. Either way the client keeps
    its device-side optimizer across rounds and drops it when its adapter restarts or is rebuilt. `splits`:
    whether the method splits the model (else a step is the whole model's).
    """

    def __init__(self, record: Client, replica: Replica, data, collate, cfg, splits: bool = True,
                 hetlora_lambda: float = 0.0, shares_replica: bool = True):
        self.record, self.replica, self.data, self.collate, self.cfg = record, replica, data, collate, cfg
        self.splits, self.hetlora_lambda, self.shares_replica = splits, hetlora_lambda, shares_replica
        self.opt = None
        self._graph = None  # the smashed data of the step in flight, with its autograd graph
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

    def open(self, msg: Open) -> Hello:
        return Hello(self.name, os.getpid())

    def away(self, msg: Away) -> None:
        return None

    def finish(self, msg: Finish) -> None:
        return None

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

    def optimizer_state(self, msg: OptimizerState) -> Optimizer:
        """The device-side optimizer's state, for the server's checkpoint (None: starts fresh next round)."""
        return Optimizer(None if self.opt is None else self.opt.state_dict())

    # ---- a round -----------------------------------------------------------------------------------

    def _new_optimizer(self) -> None:
        has = self.replica.has_adapter(self.name)
        params = adapter_parameters(self.replica.pm, self.name, self.record.device_layers) if has else []
        self.opt = torch.optim.AdamW(params, lr=self.cfg.lr) if params else None

    def begin_round(self, msg: BeginRound) -> None:
        """AdamW over the client's device-side adapters: kept from the last round unless they restarted."""
        if self.opt is None:
            self._new_optimizer()
        self.replica.pm.train()

    def step(self, msg: Step) -> Smashed | Loss:
        """The device part's forward on the step's mini-batch (the graph stays until `backward`; in a calibrating
        step, hooks on the device side's frozen layers keep their inputs for the backward); or, for a method
        that does not split, the whole step."""
        batch = self._batch(msg.positions)
        if not self.splits:
            with self._own():
                return Loss(unsplit_step(self.replica.pm, batch, self.opt, self.hetlora_lambda, self.cfg.gamma,
                                         self.name))
        part = ClientPart(self.replica.pm, self.record.split_point)
        self._scores = None
        if msg.calibrate:
            self._cli = side_matrices(unwrap(self.replica.pm).config, self.record.split_point, "client")
            self._scores = self._scoring.enter_context(riding(self.replica.pm, self._cli, part.embeddings))
        with self._own():
            self._graph = part(batch["input_ids"], batch["attention_mask"])
        return Smashed(self._graph.detach(), batch["attention_mask"], batch["labels"])

    def backward(self, msg: Backward) -> Scores | None:
        """Backward from the smashed data's gradient and the device optimizer's step; in a calibrating step, the
        device side's RNGWP scores (float64, one per device-side matrix)."""
        smashed, self._graph = self._graph, None
        try:
            client_update(smashed, msg.grad.to(smashed.device), self.opt)
        finally:
            self._scoring.close()
        if not msg.scored:
            return None
        return Scores(torch.tensor([self._scores[m.name] for m in self._cli], dtype=torch.float64))

    # ---- aggregation -------------------------------------------------------------------------------

    def upload(self, msg: Upload) -> Factors:
        return Factors(self.replica.factors(self.name, self.record.device_layers))

    def final_state(self) -> dict:
        """The client's device side: split point, frozen weights and adapters (for checks after a run)."""
        pm, s = self.replica.pm, self.record.split_point
        has = self.replica.has_adapter(self.name)
        return {"split_point": s,
                "weights": {m.name: base_weight(pm, m.name).detach().clone()
                            for m in side_matrices(unwrap(pm).config, s, "client")},
                "adapters": {n: read_adapter(pm, n, self.name) for n in adapter_names(pm, self.name)} if has else {}}

