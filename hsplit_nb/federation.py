"""Federation: clients, the main server, rounds, reconfiguration, byte accounting and the simulated clock.

One process simulates the whole system. Every copy of a frozen weight (the server's and each client's)
is identical at all times, because every merge reaches every copy; the simulation therefore keeps one
frozen base model and gives each client its own named peft adapter (`c0`, `c1`, ...), covering its
device-side and, held by the server for it, its server-side matrices. Clients run one after another
within a local step; with per-client server-side adapters they are independent between aggregations,
so this is exactly the parallel (SFL) schedule, and the simulated clock charges parallel time.
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .adapters import (
    adapter_names, adapter_parameters, add_adapters, base_weight, candidate_matrices, merge_delta, read_adapter,
    restart_adapter, restart_seed, write_adapter,
)
from .aggregation import MERGING, Stacked, communication, get_aggregator, hetlora_regulariser
from .data import Collator
from .importance import ImportanceTracker, resource_changes, rngwp_scores, side_matrices
from .methods import Method
from .metrics import perplexity
from .planner import (
    ClientSpec, Dims, activation_bytes, adapter_bytes, block_flops, client_memory, dtype_bytes,
    default_server_speed, head_flops, plan, weight_bytes,
)
from .split import nbytes, num_blocks, split_model, split_step, unwrap

SERVER_ADAPTER = "server"
CENTRAL_ADAPTER = "central"


class NoClientFits(ValueError):
    """No client can take part (HetLoRA with strict memory when the whole model fits nowhere)."""


@dataclass
class FedSettings:
    local_steps: int = 5
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 1e-3
    ft_lr: float = 5e-5
    rank_levels: tuple = (0, 2, 4, 8, 16)
    headroom: float = 0.1
    iwi_interval: int = 5
    beta_max: float = 0.9
    delta: float = 0.1
    server_speed: float | None = None
    gamma: float = 0.9  # HetLoRA's regulariser keeps the first ceil(gamma r) rank components free
    seed: int = 0
    split_points: list | None = None  # fixed split per client for ARMSC methods


@dataclass
class Client:
    name: str
    spec: ClientSpec
    indices: list[int]
    split_point: int = 0
    ranks: dict[str, int] = field(default_factory=dict)
    present: bool = True
    excluded: bool = False  # left out for good (HetLoRA with strict memory: the model does not fit)
    epoch: int = 0
    pos: int = 0


BYTE_KINDS = ("smashed_up", "grad_down", "adapter_up", "adapter_down", "weights_down", "calibration_up",
              "calibration_down")


def _zero_bytes() -> dict[str, int]:
    return dict.fromkeys(BYTE_KINDS, 0)


def next_indices(c: Client, batch_size: int, seed: int, stream: int) -> list[int]:
    """Positions (into c.indices) of a client's next mini-batch, advancing c.epoch and c.pos: its partition
    reshuffled every epoch, deterministically by (seed, stream, epoch)."""
    out: list[int] = []
    while len(out) < batch_size:
        order = np.random.default_rng([seed, stream, c.epoch]).permutation(len(c.indices))
        take = order[c.pos:c.pos + batch_size - len(out)]
        out += [int(i) for i in take]
        c.pos += len(take)
        if c.pos >= len(c.indices):
            c.epoch, c.pos = c.epoch + 1, 0
    return out


def calibration_indices(c: Client, batch_size: int, seed: int, stream: int, calibration: int) -> list[int]:
    """Positions of the client's calibration batch for the given calibration count."""
    g = np.random.default_rng([seed, stream, 10_000 + calibration])
    return [int(i) for i in g.choice(len(c.indices), size=min(batch_size, len(c.indices)), replace=False)]


def unsplit_step(model, batch: dict, opt, method: Method, gamma: float, adapter: str) -> float:
    """A no-split method's local step on the whole model (HetLoRA adds its self-pruning term); returns the
    loss without the regulariser."""
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    total = loss
    if method.hetlora_lambda:
        total = loss + method.hetlora_lambda * hetlora_regulariser(model, gamma, adapter=adapter)
    total.backward()
    if opt is not None:
        opt.step()
    return loss.item()


def calibration_bytes(batch: dict, hidden: int, p: int, n_client_matrices: int) -> tuple[int, int]:
    """What a split calibration moves for one client: smashed data, mask and labels plus one float64 score
    per client-side matrix up; the smashed data's gradient down."""
    smashed = batch["input_ids"].numel() * hidden * p
    return smashed + nbytes(batch.get("attention_mask"), batch["labels"]) + 8 * n_client_matrices, smashed


class Federation:
    """One method's federation over a shared frozen base model."""

    def __init__(self, model, tokenizer, method: Method, clients: list[Client], train_dataset, settings: FedSettings,
                 device="cpu"):
        self.model, self.tokenizer, self.method, self.clients = model, tokenizer, method, clients
        self.data, self.cfg, self.device = train_dataset, settings, device
        self.config = unwrap(model).config
        self.dims = Dims.of(self.config)
        self.L = num_blocks(self.config)
        self.p = dtype_bytes(next(model.parameters()).dtype)
        self.matrices = candidate_matrices(self.config)
        self.collate = Collator(tokenizer.pad_token_id)
        self.levels = tuple(sorted(set(settings.rank_levels)))
        self.tracker = ImportanceTracker([m.name for m in self.matrices], settings.beta_max, settings.delta) \
            if method.importance == "iwi" else None
        self.aggregator = get_aggregator(method.aggregator) if method.aggregator != "none" else None
        self.pm = None  # the peft model, once adapters exist
        self.touched: set[str] = set()  # matrices whose frozen weight has been merged into
        self.global_deltas: dict[str, Stacked] = {}  # non-merging aggregators: the global model's deltas
        self.calibrations = 0
        self.local_step = 0
        self.pending: list[str] = []
        self.configured_state = None
        self.sim_time = 0.0
        self.wall_time = 0.0
        self.missed: set[str] = set()  # clients that were away for an aggregation
        self.generation = 0  # counts configurations and aggregations: with the seed, it keys adapter restarts
        self.last_reset: dict[str, int] = {}  # adapter -> generation of its last restart
        self.merge_log: list[tuple[str, Stacked]] | None = None  # a list collects merges (distributed server)
        self._calibration_bytes: dict[str, dict[str, int]] = {}
        self.pooled = Client("pooled", clients[0].spec, sorted(i for c in clients for i in c.indices))

    # ---- set-up and (re)configuration ----------------------------------------------------------

    def start(self) -> None:
        """Initial calibration (IWI) and configuration, before the first round."""
        if self.method.ranks == "full":
            for p in self.model.parameters():
                p.requires_grad_(True)
            return
        if self.method.split == "central":
            self.pm = add_adapters(self.model, self.levels[-1], adapter=CENTRAL_ADAPTER)
            return
        if self.method.strict_memory:
            self._exclude_clients_that_cannot_hold_the_model()
        if self.tracker is not None:
            self.pm = self.model  # calibrate the frozen model itself
            if self.method.splits:  # at the split ARMSC picks without importance; RNGWP does not depend on it
                provisional = self._plan(uniform=True)
                for c in self.present:
                    c.split_point = provisional[c.name][0]
            self.calibrate()
        self.configure(initial=True)

    def _exclude_clients_that_cannot_hold_the_model(self) -> None:
        """Charge the whole model (frozen weights, adapters, activations of every block, logits) to each
        client's budget; clients it does not fit stay out of training for good."""
        ranks = self._plan()
        cfg = self.cfg
        for c in self.clients:
            r = ranks[c.name][1]
            need = weight_bytes(self.config, self.p) + adapter_bytes(self.config, r) + \
                activation_bytes(self.config, self.L, r, cfg.batch_size, cfg.seq_len, self.p) + \
                cfg.batch_size * cfg.seq_len * self.dims.vocab * 4
            if need > (1 - cfg.headroom) * c.spec.memory:
                c.excluded, c.present = True, False
        if not self.present:
            raise NoClientFits("strict memory: no client can hold the whole model (largest budget "
                               f"{max(c.spec.memory for c in self.clients) / 1e9:.3f} GB)")

    @property
    def present(self) -> list[Client]:
        return [c for c in self.clients if c.present]

    def _importance(self):
        return self.tracker.importance() if self.tracker is not None else None

    def _plan(self, uniform: bool = False) -> dict[str, tuple[int, dict[str, int]]]:
        """Split point and ranks per present client, by the method's policies (`uniform`: ignore IWI)."""
        present = self.present
        m, cfg = self.method, self.cfg
        if m.split == "armsc":
            fixed = None if cfg.split_points is None else [cfg.split_points[self.clients.index(c)] for c in present]
            out = plan(self.config, [c.spec for c in present], None if uniform else self._importance(),
                       cfg.batch_size, cfg.seq_len,
                       self.levels, self.p, cfg.headroom, cfg.server_speed, fixed_split_points=fixed)
            return {cp.name: (cp.split_point, cp.ranks) for cp in out.clients}
        if m.split == "weakest":
            s, r = self._weakest_config()
            return {c.name: (s, {mm.name: r for mm in self.matrices}) for c in present}
        # no split: ranks follow the budgets' order over all clients (present or not)
        positive = [lv for lv in self.levels if lv > 0]
        order = sorted(self.clients, key=lambda c: c.spec.memory)
        k = len(order)
        rank_of = {c.name: positive[round(i * (len(positive) - 1) / max(k - 1, 1))] for i, c in enumerate(order)}
        return {c.name: (self.L, {mm.name: rank_of[c.name] for mm in self.matrices}) for c in present}

    def _weakest_config(self) -> tuple[int, int]:
        """The split (ARMSC's latency choice for a federation of weakest clients) and the largest uniform
        rank that the weakest present budget fits; shallower splits are tried if that rank does not fit."""
        weakest = min(self.present, key=lambda c: c.spec.memory).spec
        copies = [ClientSpec(c.name, weakest.memory, weakest.flops,
                             weakest.bandwidth) for c in self.present]
        cfg = self.cfg
        s0 = min(cp.split_point for cp in plan(self.config, copies, None, cfg.batch_size, cfg.seq_len, self.levels,
                                               self.p, cfg.headroom, cfg.server_speed).clients)
        room = (1 - cfg.headroom) * weakest.memory
        for s in range(s0, 0, -1):
            for r in reversed([lv for lv in self.levels if lv > 0]):
                if client_memory(self.config, s, {mm.kind: r for mm in self.matrices}, cfg.batch_size, cfg.seq_len,
                                 self.p) <= room:
                    return s, r
        raise ValueError(f"the weakest budget ({weakest.memory:.0f} bytes) fits no uniform rank "
                         f"{[lv for lv in self.levels if lv > 0]} at any split point")

    def _state_for_trigger(self):
        return {c.name: c.spec.memory for c in self.clients}, {c.name for c in self.present}

    def configure(self, initial: bool = False) -> dict[str, int]:
        """(Re)plan split points and ranks and rebuild the adapters that changed. Returns, per client, the
        bytes of weights it must download: the blocks it newly hosts and, for non-merging aggregators, the
        global deltas of its device-side matrices folded in before the rebuild."""
        self.generation += 1
        downloads = {}
        if not initial and self.aggregator is not None and self.method.aggregator not in MERGING:
            downloads = self._fold_bytes()
            self._fold_global_deltas()  # persistent adapters: merge what they learned before rebuilding
        new = self._plan()
        for c in self.present:
            s, ranks = new[c.name]
            if not initial and s > c.split_point and self.method.splits:
                downloads[c.name] = downloads.get(c.name, 0) + (s - c.split_point) * self.dims.block_params * self.p
            changed = initial or (s, ranks) != (c.split_point, c.ranks)
            c.split_point, c.ranks = s, ranks
            if changed:
                self._build_adapter(c)
        if self.method.server == "shared":
            s = min(c.split_point for c in self.present)
            r = next(iter(new.values()))[1]
            self._replace_adapter(SERVER_ADAPTER, {n: rk for n, rk in r.items() if self._layer(n) >= s})
        budgets, present = self._state_for_trigger()
        if self.tracker is not None:
            self.tracker.configured(budgets, present)
        self.configured_state = (budgets, present)
        self.pending = []
        return downloads

    @staticmethod
    def _layer(name: str) -> int:
        return int(name.split(".")[2])

    def _adapter_ranks(self, c: Client) -> dict[str, int]:
        if self.method.server == "shared":
            return {n: r for n, r in c.ranks.items() if self._layer(n) < c.split_point}
        return dict(c.ranks)

    def _build_adapter(self, c: Client) -> None:
        self._replace_adapter(c.name, self._adapter_ranks(c))

    def _replace_adapter(self, name: str, ranks: dict[str, int]) -> None:
        if self._has_adapter(name):
            self.pm.delete_adapter(name)
        if any(r > 0 for r in ranks.values()):
            self.pm = add_adapters(self.pm if self.pm is not None else self.model, ranks, adapter=name)
            for n in adapter_names(self.pm, name):
                self._restart(n, name)
            self.last_reset[name] = self.generation

    def _restart(self, name: str, adapter: str) -> None:
        """Restart one adapter matrix from the seed keyed by (seed, adapter, matrix, generation)."""
        restart_adapter(self.pm, name, adapter, restart_seed(self.cfg.seed, adapter, name, self.generation))

    def _has_adapter(self, name: str) -> bool:
        return self.pm is not None and unwrap(self.pm) is not self.pm and name in self.pm.peft_config

    def _activate(self, c: Client | None) -> list[str]:
        names = []
        if c is not None and self._has_adapter(c.name):
            names.append(c.name)
        if self.method.server == "shared" and self._has_adapter(SERVER_ADAPTER):
            names.append(SERVER_ADAPTER)
        if not names:
            raise RuntimeError(f"client {c.name if c else None!r} has no adapter to train")
        self.pm.base_model.set_adapter(names)
        return names

    # ---- data -----------------------------------------------------------------------------------

    def stream(self, c: Client) -> int:
        """The client's data stream number (the pooled client of the centralised methods comes last)."""
        return self.clients.index(c) if c in self.clients else len(self.clients)

    def _batch(self, c: Client, positions: list[int]) -> dict:
        return {k: v.to(self.device) for k, v in self.collate([self.data[c.indices[i]] for i in positions]).items()}

    def _next_batch(self, c: Client) -> dict:
        return self._batch(c, next_indices(c, self.cfg.batch_size, self.cfg.seed, self.stream(c)))

    def _calibration_batch(self, c: Client) -> dict:
        return self._batch(c, calibration_indices(c, self.cfg.batch_size, self.cfg.seed, self.stream(c),
                                                  self.calibrations))

    # ---- IWI ------------------------------------------------------------------------------------

    def calibrate(self) -> None:
        """RNGWP on one batch per present client, averaged with data weights, folded into the tracker;
        a trigger marks a reconfiguration for the next round boundary."""
        present = self.present
        total = sum(len(c.indices) for c in present)
        scores = {m.name: 0.0 for m in self.matrices}
        for c in present:
            for n, v in self._client_rngwp(c).items():
                scores[n] += len(c.indices) / total * v
        self.tracker.update(scores)
        self.calibrations += 1
        if self.configured_state is not None:
            self.pending = self.tracker.trigger()  # importance only; resources are checked at the boundary

    def _calibration_split(self, c: Client) -> int | None:
        return c.split_point if self.method.splits and 0 < c.split_point < self.L else None

    def _client_rngwp(self, c: Client) -> dict[str, float]:
        """RNGWP of every matrix on the client's calibration batch, by the split protocol at its split."""
        if self._has_adapter(c.name):
            self._activate(c)
        split = self._calibration_split(c)
        batch = self._calibration_batch(c)
        if split is not None:
            self._count_calibration(c, *calibration_bytes(batch, self.dims.d, self.p,
                                                          len(side_matrices(self.config, split, "client"))))
        return rngwp_scores(self.pm, batch, split_point=split)

    def _count_calibration(self, c: Client, up: int, down: int) -> None:
        b = self._calibration_bytes.setdefault(c.name, {"calibration_up": 0, "calibration_down": 0})
        b["calibration_up"] += up
        b["calibration_down"] += down

    # ---- round boundary: events and reconfiguration -------------------------------------------

    def begin_round(self, r: int, events=()) -> dict:
        """Apply the events scheduled for round r, and reconfigure (ARMSC) if the IWI trigger fired during
        the last round, a budget changed, or a client left or returned. Returns the reasons and, per
        client, the bytes of weights it downloads (newly hosted layers, or what it missed while away)."""
        downloads: dict[str, int] = {}
        returned = []
        for c in self.clients:
            away = c.excluded or any(e["type"] == "dropout" and e["client"] == c.name and e["start"] <= r <= e["end"]
                                     for e in events)
            if c.present and away:
                c.present = False
            elif not c.present and not away:
                c.present = True
                returned.append(c)
            for e in events:
                if e["type"] == "budget" and e["client"] == c.name and e["round"] == r:
                    c.spec = ClientSpec(c.name, e["memory"], c.spec.speed, c.spec.bandwidth)
        if not self.present:
            raise RuntimeError(f"round {r}: every client is away; the federation cannot train")
        for c in returned:
            if c.name in self.missed:
                downloads[c.name] = self._catch_up_bytes(c)
                self.missed.discard(c.name)
        reasons = list(self.pending)
        if self.configured_state is not None:
            reasons += resource_changes(*self.configured_state, *self._state_for_trigger())
        reconfigure = bool(reasons) and self.method.split in ("armsc", "weakest")
        if reconfigure:
            for name, b in self.configure().items():
                downloads[name] = downloads.get(name, 0) + b
        elif reasons and self.configured_state is not None:
            self.configured_state = self._state_for_trigger()
            self.pending = []
        return {"reasons": reasons, "reconfigured": reconfigure, "weights_down": downloads}

    def _catch_up_bytes(self, c: Client) -> int:
        """What a returning client downloads: the merged weights of its device-side matrices that have been
        merged into and, for non-merging aggregators, its device-side adapter factors."""
        device = [m for m in self.matrices if m.layer < min(c.split_point, self.L)]
        merged = sum(m.d_in * m.d_out * self.p for m in device if m.name in self.touched)
        if self.method.aggregator in MERGING:
            return merged
        return merged + sum(c.ranks.get(m.name, 0) * m.rank1_cost * 4 for m in device)

    def _fold_bytes(self) -> dict[str, int]:
        """Before a rebuild, non-merging methods fold the global deltas into the frozen weights: each present
        client downloads the factors of those on its device side."""
        out = {}
        for c in self.present:
            b = sum(st.rank * (st.A.shape[1] + st.B.shape[0]) * 4 for n, st in self.global_deltas.items()
                    if self._layer(n) < min(c.split_point, self.L))
            if b:
                out[c.name] = b
        return out

    def _drain_calibration_bytes(self, bytes_) -> None:
        for name, b in self._calibration_bytes.items():
            for k, v in b.items():
                bytes_[name][k] += v
        self._calibration_bytes = {}

    # ---- one round ------------------------------------------------------------------------------

    def _optimizers(self):
        """Fresh AdamW per round: device-side and server-side adapter parameters of every present client."""
        opts = {}
        shared = None
        if self.method.server == "shared" and self._has_adapter(SERVER_ADAPTER):
            shared = torch.optim.AdamW(adapter_parameters(self.pm, SERVER_ADAPTER), lr=self.cfg.lr)
        for c in self.present:
            if not self._has_adapter(c.name):
                opts[c.name] = (None, shared)
                continue
            device = adapter_parameters(self.pm, c.name, range(min(c.split_point, self.L)))
            server = adapter_parameters(self.pm, c.name, range(c.split_point, self.L))
            opts[c.name] = (torch.optim.AdamW(device, lr=self.cfg.lr) if device else None,
                            shared if self.method.server == "shared" else
                            (torch.optim.AdamW(server, lr=self.cfg.lr) if server else None))
        return opts

    def _client_step(self, c: Client, opts) -> tuple[float, dict[str, int]]:
        batch = self._next_batch(c)
        self._activate(c)
        if self.method.splits:
            client, server = split_model(self.pm, c.split_point)
            r = split_step(client, server, batch, *opts[c.name])
            return r.loss, {"smashed_up": r.bytes_up, "grad_down": r.bytes_down}
        return unsplit_step(self.pm, batch, opts[c.name][0], self.method, self.cfg.gamma, c.name), {}

    def _local_step(self, opts, bytes_, losses) -> dict[str, int]:
        """One local step of every present client (in index order); returns the bytes each moved."""
        step_bytes = {}
        for c in self.present:
            loss, b = self._client_step(c, opts)
            losses.append(loss)
            for k, v in b.items():
                bytes_[c.name][k] += v
            step_bytes[c.name] = sum(b.values())
        return step_bytes

    def _central_steps(self, n_steps: int) -> list[float]:
        """CenLoRA / FT: one model on the pooled data of all clients."""
        model = self.model if self.method.ranks == "full" else self.pm
        params = [p for p in model.parameters() if p.requires_grad]
        lr = self.cfg.ft_lr if self.method.ranks == "full" else self.cfg.lr
        opt = torch.optim.AdamW(params, lr=lr)
        losses = []
        model.train()
        for _ in range(n_steps):
            batch = self._next_batch(self.pooled)
            opt.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    def _step_time(self, per_client_bytes: dict[str, int]) -> float:
        """Simulated seconds of one parallel local step from the latency model and the bytes counted."""
        fb = block_flops(self.dims, self.cfg.batch_size, self.cfg.seq_len)
        hf = head_flops(self.dims, self.cfg.batch_size, self.cfg.seq_len)
        speeds = [c.spec.flops for c in self.clients]
        server_speed = self.cfg.server_speed or default_server_speed(speeds)
        if not self.method.federated:
            factor = 1.5 if self.method.ranks == "full" else 1.0  # FT also computes weight gradients
            return factor * (self.L * fb + hf) / server_speed
        times, server = [], 0.0
        for c, speed in zip(self.clients, speeds):
            if not c.present:
                continue
            if self.method.splits:
                times.append(c.split_point * fb / speed + per_client_bytes.get(c.name, 0) / c.spec.bandwidth)
                server += ((self.L - c.split_point) * fb + hf) / server_speed
            else:
                times.append((self.L * fb + hf) / speed)
        return max(max(times), server)

    def run_round(self, r: int, weights_down: dict[str, int] | None = None) -> dict:
        """I local steps for every present client, then aggregation; returns the round's record.
        `weights_down`: bytes of weights clients download at the boundary (from `begin_round`)."""
        start = time.perf_counter()
        bytes_ = {c.name: _zero_bytes() for c in self.clients}
        losses: list[float] = []
        sim = 0.0
        for name, b in (weights_down or {}).items():
            bytes_[name]["weights_down"] += b
        sim += max((b / c.spec.bandwidth for c in self.clients for n, b in (weights_down or {}).items()
                    if n == c.name), default=0.0)
        if not self.method.federated:
            n = self.cfg.local_steps * len(self.clients)
            losses = self._central_steps(n)
            sim = n * self._step_time({})
        else:
            self.pm.train()
            opts = self._optimizers()
            for _ in range(self.cfg.local_steps):
                if self.tracker is not None and self.local_step > 0 and self.local_step % self.cfg.iwi_interval == 0:
                    self.calibrate()
                    self.pm.train()
                    sim += self._step_time({})  # a calibration costs about one step
                sim += self._step_time(self._local_step(opts, bytes_, losses))
                self.local_step += 1
            self._drain_calibration_bytes(bytes_)
            sim += self._aggregate(bytes_)
            self.missed |= {c.name for c in self.clients if not c.present}
        self.sim_time += sim
        self.wall_time += time.perf_counter() - start
        return {"round": r, "train_loss": float(np.mean(losses)), "bytes": bytes_}

    # ---- aggregation ----------------------------------------------------------------------------

    def _aggregate(self, bytes_) -> float:
        """Aggregate every matrix of every client (wherever its adapter lives); returns the transfer seconds."""
        name = self.method.aggregator
        self.generation += 1
        for m in self.matrices:
            holders = [c for c in self.clients if c.ranks.get(m.name, 0) > 0 and self._has_adapter(c.name)
                       and not (self.method.server == "shared" and self._layer(m.name) >= c.split_point)]
            if not holders:
                continue
            # absent clients have weight 0: they add nothing, but get what they would have received
            factors = [read_adapter(self.pm, m.name, c.name) for c in holders]
            weights = [len(c.indices) if c.present else 0 for c in holders]
            agg = self.aggregator(factors, weights)
            on_device = [self._layer(m.name) < c.split_point for c in holders]
            ranks = [f.rank if c.present else 0 for f, c in zip(factors, holders)]
            comm = communication(name, ranks, m.d_in, m.d_out, on_device)
            for c, cb in zip(holders, comm):
                if c.present:
                    bytes_[c.name]["adapter_up"] += cb["up"]
                    bytes_[c.name]["adapter_down"] += cb["down"]
            if name in MERGING:
                if agg.merge is not None:
                    self._merge(m.name, agg.merge)
                for c in holders:
                    self._restart(m.name, c.name)
                    self.last_reset[c.name] = self.generation
                rank_sum = agg.merge.rank if agg.merge is not None else 0
                for c in self.present:  # a client hosting the layer without an adapter there still merges
                    if c not in holders and self._layer(m.name) < c.split_point and rank_sum:
                        bytes_[c.name]["adapter_down"] += rank_sum * (m.d_in + m.d_out) * 4
            else:
                for c, f in zip(holders, agg.factors):
                    if f is not None:
                        write_adapter(self.pm, m.name, f[0], f[1], c.name)
                if agg.global_delta is not None:
                    self.global_deltas[m.name] = agg.global_delta
        if self.method.server == "shared" and self._has_adapter(SERVER_ADAPTER):
            for n in adapter_names(self.pm, SERVER_ADAPTER):
                f = read_adapter(self.pm, n, SERVER_ADAPTER)
                self.global_deltas[n] = Stacked(f.scale * f.B, f.A)
        return max((sum(v for k, v in b.items() if k.startswith(("adapter", "weights"))) / c.spec.bandwidth
                    for c, b in ((c, bytes_[c.name]) for c in self.present)), default=0.0)

    def _merge(self, name: str, stacked: Stacked) -> None:
        merge_delta(self.pm, name, stacked.delta())
        self.touched.add(name)
        if self.merge_log is not None:
            self.merge_log.append((name, stacked))

    def _fold_global_deltas(self) -> None:
        """Merge the global model's deltas into the frozen weights and restart every adapter."""
        for name, stacked in self.global_deltas.items():
            self._merge(name, stacked)
        self.global_deltas = {}
        for adapter in list(self.pm.peft_config):
            for n in adapter_names(self.pm, adapter):
                self._restart(n, adapter)
            self.last_reset[adapter] = self.generation

    # ---- evaluation -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def global_model(self):
        """The global model: merged frozen weights plus, for non-merging aggregators, the global deltas
        (added to a snapshot and restored exactly afterwards); per-client adapters are switched off."""
        if not self.method.federated:
            if self.method.split == "central" and self.pm is not None:
                self.pm.base_model.set_adapter([CENTRAL_ADAPTER])
                yield self.pm
            else:
                yield self.model
            return
        saved = {n: base_weight(self.pm, n).detach().clone() for n in self.global_deltas}
        try:
            for n, st in self.global_deltas.items():
                merge_delta(self.pm, n, st.delta())
            with self.pm.disable_adapter():
                yield self.pm
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    base_weight(self.pm, n).copy_(w)

    def evaluate_ppl(self, batches) -> float:
        with self.global_model() as model:
            return perplexity(model, batches, self.device)

    # ---- bookkeeping ----------------------------------------------------------------------------

    def trainable_params(self) -> tuple[int, int]:
        """(parameters trained on clients, on the server), summed over clients."""
        if not self.method.federated:
            model = self.model if self.method.ranks == "full" else self.pm
            return 0, sum(p.numel() for p in model.parameters() if p.requires_grad)
        on_clients = on_server = 0
        for c in self.clients:
            if not self._has_adapter(c.name):
                continue
            on_clients += sum(p.numel() for p in adapter_parameters(self.pm, c.name, range(min(c.split_point, self.L))))
            on_server += sum(p.numel() for p in adapter_parameters(self.pm, c.name, range(c.split_point, self.L)))
        if self._has_adapter(SERVER_ADAPTER):
            on_server += sum(p.numel() for p in adapter_parameters(self.pm, SERVER_ADAPTER))
        return on_clients, on_server

    def state(self) -> dict:
        """Everything needed to resume after this round boundary (see `load_state`)."""
        model = self.pm if self.pm is not None else self.model
        state = {
            "touched": {n: base_weight(model, n).detach().clone() for n in sorted(self.touched)},
            "clients": [{"split_point": c.split_point, "ranks": c.ranks, "present": c.present,
                         "excluded": c.excluded, "epoch": c.epoch,
                         "pos": c.pos, "memory": c.spec.memory} for c in self.clients + [self.pooled]],
            "missed": sorted(self.missed),
            "adapters": {},
            "global_deltas": {n: (st.B, st.A) for n, st in self.global_deltas.items()},
            "calibrations": self.calibrations, "local_step": self.local_step, "pending": list(self.pending),
            "generation": self.generation, "last_reset": dict(self.last_reset),
            "configured_state": self.configured_state, "sim_time": self.sim_time, "wall_time": self.wall_time,
            "tracker": None if self.tracker is None else {
                k: getattr(self.tracker, k) for k in ("t", "ibar", "history", "_g_config", "_budgets_config",
                                                      "_present_config")},
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        }
        if self.method.ranks == "full":
            state["full"] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        elif self.pm is not None and unwrap(self.pm) is not self.pm:
            for adapter in self.pm.peft_config:
                state["adapters"][adapter] = {n: read_adapter(self.pm, n, adapter) for n in
                                              adapter_names(self.pm, adapter)}
        return state

    def load_state(self, state: dict) -> None:
        """Restore a state written by `state()` into a federation built from the same configuration."""
        self.missed = set(state["missed"])
        for c, s in zip(self.clients + [self.pooled], state["clients"]):
            c.split_point, c.ranks, c.present, c.excluded, c.epoch, c.pos = s["split_point"], s["ranks"], \
                s["present"], s["excluded"], s["epoch"], s["pos"]
            c.spec = ClientSpec(c.spec.name, s["memory"], c.spec.speed, c.spec.bandwidth)
        if self.method.ranks == "full":
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    p.copy_(state["full"][n])
                    p.requires_grad_(True)
        else:
            for adapter, mats in state["adapters"].items():
                self._replace_adapter(adapter, {n: f.rank for n, f in mats.items()})
                for n, f in mats.items():
                    write_adapter(self.pm, n, f.A, f.B, adapter)
            if self.pm is None:
                self.pm = self.model
            with torch.no_grad():
                for n, w in state["touched"].items():
                    base_weight(self.pm, n).copy_(w)
        self.touched = set(state["touched"])
        self.global_deltas = {n: Stacked(B, A) for n, (B, A) in state["global_deltas"].items()}
        self.calibrations, self.local_step = state["calibrations"], state["local_step"]
        self.generation, self.last_reset = state["generation"], dict(state["last_reset"])
        self.pending, self.configured_state = state["pending"], state["configured_state"]
        self.sim_time, self.wall_time = state["sim_time"], state["wall_time"]
        if self.tracker is not None and state["tracker"] is not None:
            for k, v in state["tracker"].items():
                setattr(self.tracker, k, v)
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
