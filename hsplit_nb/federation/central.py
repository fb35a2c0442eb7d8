"""The centralised references: one model trained on the pooled data of every client (CenLoRA with the top
rank on every matrix, or full fine-tuning), with the same rounds, clock and checkpoints as a federation."""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from ..adapters import add_adapters, write_adapter
from ..data import Collator
from ..metrics import perplexity
from . import checkpoint
from .clients import Client, next_indices
from .divergence import finite
from ..latency import TimeModel
from .clock import Clock
from .ledger import Ledger
from .replica import Replica

CENTRAL_ADAPTER = "central"


class CentralTraining:
    """CenLoRA or FT: every client's data pooled on the server; no client trains, nothing is communicated."""

    def __init__(self, model, tokenizer, method, clients: list[Client], train_dataset, cfg, device="cpu"):
        self.model, self.method, self.clients, self.data, self.cfg, self.device = \
            model, method, clients, train_dataset, cfg, device
        self.collate = Collator(tokenizer.pad_token_id)
        self.replica = Replica(model, cfg.seed, cfg.top_rank, cfg.alpha)
        self.clock = Clock(TimeModel.of(model.config, cfg.batch_size, cfg.seq_len, server_speed=cfg.server_speed))
        self.pooled = Client("pooled", clients[0].spec, sorted(i for c in clients for i in c.indices))
        self.sim_time = self.wall_time = 0.0
        self.top_rank = cfg.top_rank
        self.opt = None
        self.round = self.step_in_round = 0

    @property
    def present(self) -> list[Client]:
        return [c for c in self.clients if c.present]

    @property
    def full(self) -> bool:
        return not self.method.ranks.adapters

    @property
    def trained(self):
        return self.model if self.full else self.replica.pm

    def start(self) -> None:
        if self.full:
            for p in self.model.parameters():
                p.requires_grad_(True)
        else:
            self.replica.pm = add_adapters(self.model, self.top_rank, alpha=self.cfg.alpha, adapter=CENTRAL_ADAPTER)

    def run_round(self, r: int, weights_down=None) -> dict:
        """As many steps on the pooled data as all clients together take in a round."""
        start, self.round = time.perf_counter(), r
        n = self.cfg.local_steps * len(self.clients)
        model, opt = self.trained, self.optimizer()
        losses = []
        model.train()
        for self.step_in_round in range(1, n + 1):
            positions = next_indices(self.pooled, self.cfg.batch_size, self.cfg.seed, len(self.clients))
            batch = {k: v.to(self.device) for k, v in
                     self.collate([self.data[self.pooled.indices[i]] for i in positions]).items()}
            opt.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            losses.append(finite(self, loss.item(), "the training loss"))
        self.sim_time += n * self.clock.central_step(self.clients, self.method.ranks.step_flops_factor)
        self.wall_time += time.perf_counter() - start
        return {"round": r, "train_loss": float(np.mean(losses)),
                "bytes": Ledger([c.name for c in self.clients]).bytes, "reasons": []}

    @property
    def lr(self) -> float:
        return self.cfg.ft_lr if self.full else self.cfg.lr

    def optimizer(self):
        """One AdamW for the whole run: the adapters (or weights) persist, so does its state."""
        if self.opt is None:
            self.opt = torch.optim.AdamW([p for p in self.trained.parameters() if p.requires_grad],
                                         lr=self.lr)
        return self.opt

    @contextlib.contextmanager
    def global_model(self):
        if not self.full:
            self.replica.pm.base_model.set_adapter([CENTRAL_ADAPTER])
        yield self.trained

    def evaluate_ppl(self, batches) -> float:
        with self.global_model() as model:
            return perplexity(model, batches, self.device)

    def trainable_params(self) -> tuple[int, int]:
        return 0, sum(p.numel() for p in self.trained.parameters() if p.requires_grad)

    def state(self) -> dict:
        state = {"clients": checkpoint.client_records(self.clients + [self.pooled]),
                 "adapters": checkpoint.adapters_state(self.replica), "sim_time": self.sim_time,
                 "wall_time": self.wall_time, "rng": checkpoint.rng_state(),
                 "optimizer": None if self.opt is None else self.opt.state_dict()}
        if self.full:
            state["full"] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        return state

    def load_state(self, state: dict) -> None:
        checkpoint.load_client_records(self.clients + [self.pooled], state["clients"])
        if self.full:
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    p.copy_(state["full"][n])
                    p.requires_grad_(True)
        else:
            self.start()
            for n, f in state["adapters"][CENTRAL_ADAPTER].items():
                write_adapter(self.replica.pm, n, f.A, f.B, CENTRAL_ADAPTER)
        self.sim_time, self.wall_time = state["sim_time"], state["wall_time"]
        self.opt = None
        if state["optimizer"] is not None:
            self.optimizer().load_state_dict(state["optimizer"])
        checkpoint.load_rng_state(state["rng"])
