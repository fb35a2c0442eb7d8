"""The main server: plans every client's split and ranks, runs the server-side stages, aggregates, keeps
the clock and the byte ledger, evaluates and checkpoints. It talks to clients only through `ClientProxy`.

In the simulation one frozen base model is shared by the server and every in-process client: each client
has its own named peft adapter (`c0`, `c1`, ...) on its device side, and the server one shared set (`server`)
on the layers past the shallowest split, updated after each client's batch in `serve_order`. (The per-client
variant puts each client's server-side copy inside its own adapter instead.) Device sides are independent
between aggregations, so the clock charges them parallel time and the server its summed time.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

from ..adapters import adapter_names, adapter_parameters, candidate_matrices, layer_of, lora_layer
from ..costs import ClientSpec, Dims, dtype_bytes
from ..data import Collator
from ..importance import ImportanceTracker, resource_changes
from ..methods import Method, PlanInputs
from ..planner import RoundCosts, whole_model_bytes
from ..split import ServerPart, nbytes, num_blocks, server_update, unwrap
from . import boundary, calibration, checkpoint
from .clients import Client
from .ledger import Clock, Ledger
from .messages import Configure
from .boundary import SERVER_ADAPTER
from .divergence import finite
from .proxy import ClientProxy, LocalClient
from .replica import Replica


class NoClientFits(ValueError):
    """No client can take part (HetLoRA with strict memory when the whole model fits nowhere)."""


def in_process(server: "MainServer") -> dict[str, ClientProxy]:
    """The simulation's transport: every client in this process, sharing the server's replica."""
    return {c.name: LocalClient(c, server.replica, server.data, server.collate, server.cfg, k,
                                server.method.hetlora_lambda, shares_replica=True)
            for k, c in enumerate(server.clients)}


class MainServer:
    """One federated method's main server over its clients (see the module docstring)."""

    def __init__(self, model, tokenizer, method: Method, clients: list[Client], train_dataset, cfg, device="cpu",
                 transport=in_process, on_lost=None):
        self.model, self.tokenizer, self.method, self.clients = model, tokenizer, method, clients
        self.data, self.cfg, self.device, self.lr = train_dataset, cfg, device, cfg.lr
        self.config = unwrap(model).config
        self.dims, self.L = Dims.of(self.config), num_blocks(self.config)
        self.p = dtype_bytes(next(model.parameters()).dtype)
        self.matrices = candidate_matrices(self.config)
        self.collate = Collator(tokenizer.pad_token_id)
        self.levels = tuple(sorted(set(cfg.rank_levels)))
        self.tracker = ImportanceTracker([m.name for m in self.matrices], cfg.beta_max, cfg.delta) \
            if method.iwi else None
        self.aggregator = method.aggregator
        self.replica = Replica(model, cfg.seed, cfg.top_rank, cfg.alpha)
        self.clock = Clock(self.config, cfg.batch_size, cfg.seq_len, cfg.server_speed)
        self.touched: set[str] = set()  # matrices whose frozen weight has been merged into
        self.global_deltas = {}  # non-merging aggregators: the global model's deltas (matrix -> Stacked)
        self.calibrations = self.local_step = self.generation = 0  # generation keys adapter restarts
        self.pending: list[str] = []
        self.configured_state = None
        self.sim_time = self.wall_time = 0.0
        self.missed: set[str] = set()  # clients that were away for an aggregation
        self.last_reset: dict[str, int] = {}  # adapter -> generation of its last restart
        self.merges: list = []  # (matrix, Stacked) merged at the current boundary, for the clients' messages
        self.calibration_ledger = Ledger([c.name for c in clients])
        self.round = self.step_in_round = 0
        self.notes: list[str] = []
        self.lost: dict[str, str] = {}
        self.server_opts: dict = {}  # adapter -> AdamW over its server-side parameters, kept across rounds
        self.clients_by_name = {c.name: c for c in clients}
        self.on_lost, self.on_step = on_lost, None
        self.proxies = transport(self)
        self._mark_lost_clients()

    @property
    def pm(self):
        return self.replica.pm

    @property
    def present(self) -> list[Client]:
        return [c for c in self.clients if c.present]

    # ---- talking to clients -------------------------------------------------------------------------

    def ask(self, c: Client, op: str, *args):
        """Call `op` on client c's proxy. A lost client leaves for good and the answer is None."""
        proxy = self.proxies[c.name]
        if proxy.lost:
            return None
        out = getattr(proxy, op)(*args)
        if proxy.lost:
            self._lose(c, proxy.lost)
            return None
        return out

    def _lose(self, c: Client, why: str) -> None:
        c.present, c.excluded = False, True
        self.lost[c.name] = why
        self.notes.append(f"lost: {c.name} ({why})")
        print(f"[server] lost client {c.name}: {why}", file=sys.stderr, flush=True)
        if self.on_lost is not None:
            self.on_lost(c.name, why)

    def _mark_lost_clients(self) -> None:
        for c in self.clients:
            if self.proxies[c.name].lost:
                c.present, c.excluded = False, True

    def _open(self) -> None:
        for c in self.clients:
            if not c.excluded:
                self.ask(c, "open", self.method.name)

    def serving(self, c: Client):
        """The adapters of client c's server part: its own copy (per-client variant) or the shared set; c's own
        adapter stays selected too, so its device-side graph keeps its trainable leaves."""
        shared = SERVER_ADAPTER if self.method.server.shared else None
        return self.replica.using([n for n in (c.name, shared) if n is not None])

    def serve_order(self) -> list[Client]:
        """The present clients in the order the main server serves them this local step: a seeded permutation,
        rotated by one each local step, the same for every method."""
        perm = [int(k) for k in np.random.default_rng([self.cfg.seed, 7_777]).permutation(len(self.clients))]
        shift = self.local_step % len(perm)
        return [self.clients[k] for k in perm[shift:] + perm[:shift] if self.clients[k].present]

    def shared_matrices(self) -> list[str]:
        """The matrices that carry the main server's shared adapter set (none for the per-client variant)."""
        return adapter_names(self.pm, SERVER_ADAPTER) if self.replica.has_adapter(SERVER_ADAPTER) else []

    def device_ranks(self, c: Client) -> dict[str, int]:
        """The ranks of the adapters on c's device."""
        return {n: r for n, r in self.method.server.client_ranks(c.ranks, c.split_point).items()
                if r > 0 and c.hosts(layer_of(n))}

    # ---- set-up and (re)configuration ----------------------------------------------------------------

    def start(self) -> None:
        """Initial calibration (IWI) and configuration, before the first round."""
        self._open()
        if self.method.strict_memory:
            self._exclude_clients_that_cannot_hold_the_model()
        if self.tracker is not None:
            if self.method.splits:  # at the split ARMSC picks without importance; RNGWP does not depend on it
                provisional = self._plan(uniform=True)
                for c in self.present:
                    c.split_point = provisional[c.name][0]
            self.sim_time += self.clock.step(self.clients, self.method.splits, self.calibrate())  # charged too
        self.configure(initial=True)

    def _exclude_clients_that_cannot_hold_the_model(self) -> None:
        """Charge the whole model to each client's budget; clients it does not fit stay out for good."""
        ranks, cfg, needs = self._plan(), self.cfg, []
        for c in self.clients:
            need = whole_model_bytes(self.config, ranks[c.name][1], cfg.batch_size, cfg.seq_len, self.p)
            needs.append(f"{c.name} {need / (1 - cfg.headroom) / 1e6:.3f} MB")
            if need > (1 - cfg.headroom) * c.spec.memory:
                c.excluded, c.present = True, False
        if not self.present:
            raise NoClientFits("strict memory: no client can hold the whole model (largest budget "
                               f"{max(c.spec.memory for c in self.clients) / 1e6:.3f} MB; the budget each "
                               f"client needs at its rank, with the headroom: {', '.join(needs)})")

    def _plan_inputs(self, uniform: bool = False) -> PlanInputs:
        present, cfg = self.present, self.cfg
        fixed = None if cfg.split_points is None else [cfg.split_points[self.clients.index(c)] for c in present]
        return PlanInputs(self.config, [c.spec for c in present], [c.spec for c in self.clients], self.levels,
                          cfg.batch_size, cfg.seq_len, self.p, cfg.headroom, cfg.server_speed,
                          None if uniform or self.tracker is None else self.tracker.importance(), fixed, self.L,
                          cfg.server_adapter_budget, self._round_costs())

    def _round_costs(self) -> RoundCosts:
        """What ARMSC charges a round, as the clock does: local steps, the calibrations due, and aggregation traffic
        with the server's shared copy counted at the top rank level (an approximation when a smaller
        `server_adapter_budget` lowers its ranks; see docs/method.md)."""
        calibrations = self.cfg.local_steps / self.cfg.iwi_interval if self.tracker is not None else 0.0
        return RoundCosts(self.cfg.local_steps, calibrations,
                          self.cfg.top_rank if self.method.server.shared else 0)

    def _plan(self, uniform: bool = False) -> dict[str, tuple[int, dict[str, int]]]:
        """Split point and ranks per present client, by the method's policies (`uniform`: ignore IWI)."""
        x = self._plan_inputs(uniform)
        splits = self.method.split.choose(x)
        ranks = self.method.server.planned(x, splits, self.method.ranks.choose(x, splits), self.method.ranks)
        return {c.name: (s, r) for c, s, r in zip(self.present, splits, ranks)}

    def _build_shared_server_adapter(self) -> None:
        """The main server's one set on every layer some present client's server part contains, at the ranks
        the method's rank policy gives it from the server's budget."""
        s = min(c.split_point for c in self.present)
        server_side = [m for m in self.matrices if m.layer >= s]
        ranks = self.method.ranks.server(self._plan_inputs(), [c.ranks for c in self.present], server_side)
        self._replace_adapter(SERVER_ADAPTER, ranks)

    def _state_for_trigger(self):
        return {c.name: c.spec.memory for c in self.clients}, {c.name for c in self.present}

    def configure(self, initial: bool = False) -> dict[str, int]:
        """(Re)plan split points and ranks, rebuild the adapters that changed and tell each client. Returns,
        per client, the bytes of weights it downloads: the blocks it newly hosts and, for non-merging
        aggregators, the global deltas of its device-side matrices folded in before the rebuild."""
        self.generation += 1
        self.merges = []
        downloads = {}
        before = {c.name: (c.split_point, dict(c.ranks)) for c in self.clients}
        if not initial and self.global_deltas:
            downloads = boundary.fold_bytes(self)
            boundary.fold_global_deltas(self)  # persistent adapters: merge what they learned before rebuilding
        new = self._plan()
        for c in self.present:
            s, ranks = new[c.name]
            if not initial and s > c.split_point and self.method.splits:
                downloads[c.name] = downloads.get(c.name, 0) + (s - c.split_point) * self.dims.block_params * self.p
            changed = initial or (s, ranks) != (c.split_point, c.ranks)
            c.split_point, c.ranks = s, ranks
            if changed:
                self._replace_adapter(c.name, self.method.server.client_ranks(c.ranks, c.split_point))
        if self.method.server.shared:
            self._build_shared_server_adapter()
        budgets, present = self._state_for_trigger()
        if self.tracker is not None:
            self.tracker.configured(budgets, present)
        self.configured_state = (budgets, present)
        self.pending = []
        for c in self.present:
            self.ask(c, "configure", self._configure_message(c, before[c.name], initial))
        return downloads

    def _configure_message(self, c: Client, before, initial: bool) -> Configure:
        old = before[0]
        grown = range(old, c.split_point) if not initial and self.method.splits and c.split_point > old else []
        folds = [(n, st.B, st.A) for n, st in self.merges if layer_of(n) < old]
        return Configure(c.split_point, self.device_ranks(c), self.generation,
                         rebuild=initial or before != (c.split_point, c.ranks), folded=bool(self.merges),
                         folds=folds, blocks=[self.replica.block_tensors(layer) for layer in grown])

    def _replace_adapter(self, name: str, ranks: dict[str, int]) -> None:
        self.server_opts.pop(name, None)
        if self.replica.replace_adapter(name, ranks, self.generation):
            self.last_reset[name] = self.generation

    # ---- the server's optimizers: kept across rounds, forgotten where adapters restart -----------------

    def server_optimizer(self, c: Client):
        """AdamW over the server-side adapters client c trains: the shared set's, or its own copy's."""
        key = SERVER_ADAPTER if self.method.server.shared else c.name
        if key not in self.server_opts:
            self.server_opts[key] = self._new_server_optimizer(key)
        return self.server_opts[key]

    def _new_server_optimizer(self, key: str):
        if not self.replica.has_adapter(key):
            return None
        layers = None if key == SERVER_ADAPTER else range(self.clients_by_name[key].split_point, self.L)
        params = adapter_parameters(self.pm, key, layers)
        return torch.optim.AdamW(params, lr=self.lr) if params else None

    def forget(self, adapter: str, matrix: str) -> None:
        """Adapter `adapter` restarted on `matrix`: its server-side optimizer state there starts afresh."""
        opt = self.server_opts.get(adapter)
        if opt is not None and layer_of(matrix) in (range(self.L) if adapter == SERVER_ADAPTER
                                                    else range(self.clients_by_name[adapter].split_point, self.L)):
            layer = lora_layer(self.pm, matrix, adapter)
            for p in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
                opt.state.pop(p, None)

    # ---- round boundary: events and reconfiguration ------------------------------------------------

    def begin_round(self, r: int, events=()) -> dict:
        """Apply the events scheduled for round r, and reconfigure (ARMSC) if the IWI trigger fired during
        the last round, a budget changed, or a client left or returned. Returns the reasons and, per
        client, the bytes of weights it downloads (newly hosted layers, or what it missed while away)."""
        self.round = r
        returned = self._apply_events(r, events)
        if not self.present:
            lost = "; lost: " + "; ".join(f"{k} ({v})" for k, v in self.lost.items()) if self.lost else ""
            raise RuntimeError(f"round {r}: every client is away; the federation cannot train{lost}")
        downloads: dict[str, int] = {}
        for c in returned:
            if c.name in self.missed:
                downloads[c.name] = boundary.catch_up_bytes(self, c)
                self.ask(c, "catch_up", boundary.catch_up_message(self, c))
                self.missed.discard(c.name)
        reasons = list(self.pending)
        if self.configured_state is not None:
            reasons += resource_changes(*self.configured_state, *self._state_for_trigger())
        reconfigure = bool(reasons) and self.method.split.reconfigures
        if reconfigure:
            for name, b in self.configure().items():
                downloads[name] = downloads.get(name, 0) + b
        elif reasons and self.configured_state is not None:
            self.configured_state = self._state_for_trigger()
            self.pending = []
        for c in self.clients:
            if not c.present:
                self.ask(c, "away", r)  # keeps a client process's waits short
        return {"reasons": reasons, "reconfigured": reconfigure, "weights_down": downloads}

    def _apply_events(self, r: int, events) -> list[Client]:
        """Dropouts and budget changes of round r; returns the clients that came back."""
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
        return returned

    # ---- one round ----------------------------------------------------------------------------------

    def run_round(self, r: int, weights_down: dict[str, int] | None = None) -> dict:
        """I local steps for every present client, then aggregation; returns the round's record."""
        start = time.perf_counter()
        self.round, self.step_in_round = r, 0
        ledger = Ledger([c.name for c in self.clients])
        losses: list[float] = []
        for name, b in (weights_down or {}).items():
            ledger.add(name, "weights_down", b)
        sim = Clock.transfer(self.clients, weights_down or {})
        for c in self.present:
            self.ask(c, "begin_round", r)
        self.pm.train()
        for _ in range(self.cfg.local_steps):
            if self.tracker is not None and self.local_step > 0 and self.local_step % self.cfg.iwi_interval == 0:
                sim += self.clock.step(self.clients, self.method.splits, self.calibrate())
                self.pm.train()
            sim += self.clock.step(self.clients, self.method.splits, self._local_step(ledger, losses))
            self.local_step += 1
        for name, kinds in self.calibration_ledger.bytes.items():
            for kind, v in kinds.items():
                ledger.add(name, kind, v)
        self.calibration_ledger = Ledger([c.name for c in self.clients])
        sim += boundary.aggregate(self, ledger)
        self.missed |= {c.name for c in self.clients if not c.present}
        self.sim_time += sim
        self.wall_time += time.perf_counter() - start
        notes, self.notes = self.notes, []
        return {"round": r, "train_loss": float(np.mean(losses)), "bytes": ledger.bytes, "reasons": notes}

    def _local_step(self, ledger: Ledger, losses: list) -> dict[str, int]:
        """One local step of every present client, served in `serve_order`; returns the bytes each moved. The
        server's optimizer steps after each client's batch (one shared set: once per client)."""
        present = self.serve_order()
        self.step_in_round += 1
        if self.on_step is not None:
            self.on_step(self.round, self.step_in_round)
        for c in present:
            self.ask(c, "begin_step")
        step_bytes = {}
        for c in present:
            if not self.method.splits:
                loss = self.ask(c, "unsplit_step")
                if loss is not None:
                    losses.append(finite(self, float(loss), "the training loss", c))
                    step_bytes[c.name] = 0
                continue
            up = self.ask(c, "forward")
            if up is None:
                continue
            smashed, mask, labels = (t.to(self.device) for t in up)
            with self.serving(c):
                loss, grad = server_update(ServerPart(self.pm, c.split_point), smashed, mask, labels,
                                           self.server_optimizer(c))
            losses.append(finite(self, loss.item(), "the training loss", c))
            self.ask(c, "backward", grad)
            b = {"smashed_up": nbytes(smashed, mask, labels), "grad_down": nbytes(grad)}
            for kind, v in b.items():
                ledger.add(c.name, kind, v)
            step_bytes[c.name] = sum(b.values())
        return step_bytes

    # ---- IWI, evaluation, bookkeeping, checkpoints ----------------------------------------------------

    calibrate = calibration.calibrate
    global_model = boundary.global_model
    evaluate_ppl = boundary.evaluate_ppl
    trainable_params = boundary.trainable_params
    state = checkpoint.server_state
    load_state = checkpoint.load_server_state

    def finish(self, dump: bool) -> None:
        """End of this method's rounds: live client processes may write their final state (for checks)."""
        for c in self.clients:
            if not c.excluded:
                self.ask(c, "finish", dump)
