"""The main server: plans every client's split and ranks, runs the round loop and the server-side stages, and
composes its parts (links to the clients, clock, calibrator, optimizers, aggregation round). In the simulation
one frozen base model is shared by the server and every in-process client: each client has its own peft adapter
(`c0`, ...) on its device side, the server one shared set (`server`) past the shallowest split, updated after
each client's batch in `serve_order` (the per-client variant: a copy inside each client's adapter)."""
from __future__ import annotations

import time

import numpy as np

from ..adapters import candidate_matrices
from ..costs import Dims, dtype_bytes
from ..data import Collator
from ..importance import ImportanceTracker, resource_changes
from ..methods import Method, PlanInputs
from ..metrics import perplexity
from ..latency import RoundCosts, TimeModel
from ..planner import whole_model_bytes
from ..architectures import num_blocks
from ..split import ServerPart, nbytes, server_update, unwrap
from . import checkpoint, reconfiguration
from .boundary import SERVER_ADAPTER, AggregationRound
from .calibration import Calibrator
from .clients import Client, apply_events, next_indices
from .clock import Clock
from .ledger import Ledger
from .local import LocalClient
from .messages import Away, Backward, BeginRound, Finish, OptimizerState, Open, Step
from .optimizers import ServerOptimizers
from .divergence import finite
from .links import Links
from .proxy import InProcess
from .replica import Replica


def in_process(server: "MainServer") -> dict[str, InProcess]:
    """The simulation's transport: every client in this process, sharing the server's replica."""
    return {c.name: InProcess(LocalClient(c, server.replica, server.data, server.collate, server.cfg,
                                          server.method.splits, server.method.hetlora_lambda, shares_replica=True))
            for c in server.clients}


class NoClientFits(ValueError):
    """No client can take part (HetLoRA with strict memory when the whole model fits nowhere)."""


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
        self.calibrator = Calibrator(self.config, self.matrices, cfg.iwi_interval, ImportanceTracker(
            [m.name for m in self.matrices], cfg.beta_max, cfg.delta) if method.iwi else None)
        self.replica = Replica(model, cfg.seed, cfg.top_rank, cfg.alpha)
        self.clock = Clock(TimeModel.of(self.config, cfg.batch_size, cfg.seq_len, self.p, cfg.server_speed, wire=True))
        self.server_opts = ServerOptimizers(self.replica, self.lr, self._server_layers)
        self.aggregation = AggregationRound(self.replica, self.server_opts, method, self.matrices, self.p)
        self.local_step = 0
        self.configured_state = None  # what the last plan was made from
        self.wall_time = 0.0
        self.missed: set[str] = set()  # clients that were away for an aggregation
        self.reconfigurations: list[dict] = []  # rows of reconfigurations.csv
        self.round = self.step_in_round = 0
        self.clients_by_name = {c.name: c for c in clients}
        self.on_step = None
        self.links = Links(transport(self), on_lost)
        self.links.mark_lost(self.clients)

    @property
    def pm(self):
        return self.replica.pm

    @property
    def touched(self) -> set[str]:
        return self.aggregation.touched

    @property
    def generation(self) -> int:
        return self.aggregation.generation

    def shared_matrices(self) -> list[str]:
        return self.aggregation.shared_matrices()

    @property
    def sim_time(self) -> float:
        return self.clock.seconds

    @property
    def tracker(self):
        return self.calibrator.tracker

    @property
    def pending(self) -> list[str]:
        """The IWI trigger's reasons to reconfigure, waiting for the next boundary."""
        return self.calibrator.pending

    @property
    def present(self) -> list[Client]:
        return [c for c in self.clients if c.present]

    # ---- talking to clients -------------------------------------------------------------------------

    def open_clients(self) -> None:
        for c in self.clients:
            if not c.excluded:
                hello = self.links.ask(c, Open(self.method.name))
                if hello is not None and hello.client != c.name:
                    raise RuntimeError(f"the transport of client {c.name} reached client {hello.client!r}")

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

    # ---- set-up and (re)configuration ----------------------------------------------------------------

    def start(self) -> None:
        """The first configuration, before the first round: with uniform importance, since IWI's first
        calibration rides on the first local step (its plan takes effect at the first boundary)."""
        self.open_clients()
        if self.method.strict_memory:
            self._exclude_clients_that_cannot_hold_the_model()
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

    def _plan_inputs(self) -> PlanInputs:
        present, cfg = self.present, self.cfg
        fixed = None if cfg.split_points is None else [cfg.split_points[self.clients.index(c)] for c in present]
        return PlanInputs(self.config, [c.spec for c in present], [c.spec for c in self.clients], self.levels,
                          cfg.batch_size, cfg.seq_len, self.p, cfg.headroom, cfg.server_speed,
                          self.tracker.importance() if self.calibrator.ready else None, fixed, self.L,
                          cfg.server_adapter_budget, self._round_costs(), self.clock.time)

    def _round_costs(self) -> RoundCosts:
        """What ARMSC charges a round, as the clock does: local steps, the calibrations due, and aggregation traffic
        with the server's shared copy counted at the top rank level (an approximation when a smaller
        `server_adapter_budget` lowers its ranks; see docs/method.md)."""
        calibrations = self.cfg.local_steps / self.cfg.iwi_interval if self.tracker is not None else 0.0
        return RoundCosts(self.cfg.local_steps, calibrations, self.cfg.top_rank if self.method.server.shared else 0,
                          self.method.aggregator)

    def _plan(self) -> dict[str, tuple[int, dict[str, int]]]:
        """Split point and ranks per present client, by the method's policies (importance once IWI has it)."""
        x = self._plan_inputs()
        splits = self.method.split.choose(x)
        ranks = self.method.server.planned(x, splits, self.method.ranks.choose(x, splits), self.method.ranks)
        return {c.name: (s, r) for c, s, r in zip(self.present, splits, ranks)}

    def _planned_shared_ranks(self) -> dict[str, int]:
        """The shared set's ranks on every layer some present client's server part contains, as the method's rank
        policy gives them from the server's budget (none for the per-client variant)."""
        if not self.method.server.shared:
            return {}
        s = min(c.split_point for c in self.present)
        server_side = [m for m in self.matrices if m.layer >= s]
        return self.method.ranks.server(self._plan_inputs(), [c.ranks for c in self.present], server_side)

    def _state_for_trigger(self):  # what a resource trigger compares: budgets and who is present
        return {c.name: c.spec.memory for c in self.clients}, {c.name for c in self.present}

    def _own(self, split_point: int, ranks: dict[str, int]) -> dict[str, int]:
        return {n: r for n, r in self.method.server.client_ranks(ranks, split_point).items() if r > 0}

    def configure(self, initial: bool = False, cause: str = "start") -> dict[str, int]:
        """(Re)plan split points and ranks and restart only what changed (`reconfiguration`); tell each client.
        Returns, per client, the bytes of weights it downloads: the blocks it newly hosts and, for non-merging
        aggregators, the global deltas of its device-side matrices folded in before a restart."""
        agg = self.aggregation
        agg.next_generation()
        present = self.present
        before = {c.name: (c.split_point, dict(c.ranks)) for c in self.clients}
        new = self._plan()
        server_before = self.replica.ranks(SERVER_ADAPTER)
        shift = self.tracker.shift() if self.tracker is not None and self.tracker.has_configuration else None
        for c in present:
            c.split_point, c.ranks = new[c.name]
        server_after = self._planned_shared_ranks()
        own_before = {c.name: (before[c.name][0], self._own(*before[c.name])) for c in present}
        own_after = {c.name: (c.split_point, self._own(c.split_point, c.ranks)) for c in present}
        change = reconfiguration.plan_change([m.name for m in self.matrices], own_before, own_after, server_before,
                                             server_after, initial)
        downloads = {} if initial else agg.fold_changed(present, change.matrices, before)
        for c in present:
            s0 = before[c.name][0]
            if not initial and c.split_point > s0 and self.method.splits:
                downloads[c.name] = downloads.get(c.name, 0) + (c.split_point - s0) * self.dims.block_params * self.p
        agg.restart_clients(self.clients, change)
        if self.method.server.shared and (initial or server_after != server_before):
            agg.rebuild_shared(server_after, change.server_kept)
        else:  # the same matrices at the same ranks: the set stays, only its changed matrices restart in place
            for n in change.server_restarted:
                agg.restart(n, SERVER_ADAPTER)
        budgets, present_names = self._state_for_trigger()
        if self.calibrator.ready:
            self.tracker.configured(budgets, present_names)
        self.configured_state = (budgets, present_names)
        self.calibrator.pending = []
        self.reconfigurations += reconfiguration.record(self.round, cause, shift, own_before, own_after,
                                                        server_before, server_after, change)
        for c in present:
            old = before[c.name][0]
            grown = range(old, c.split_point) if not initial and self.method.splits and c.split_point > old else []
            self.links.post(c, agg.configure_message(c, old, grown, initial or c.name in change.rebuilt,
                                                     change.matrices))
        return downloads

    def _server_layers(self, adapter: str):
        """The blocks of an adapter the server trains: all of the shared set, a client's own copy past its split."""
        return None if adapter == SERVER_ADAPTER else range(self.clients_by_name[adapter].split_point, self.L)

    # ---- round boundary: events and reconfiguration ------------------------------------------------

    def begin_round(self, r: int, events=()) -> dict:
        """Apply the events scheduled for round r, and reconfigure (ARMSC) if the IWI trigger fired during
        the last round, a budget changed, or a client left or returned. Returns the reasons and, per
        client, the bytes of weights it downloads (newly hosted layers, or what it missed while away)."""
        self.round = r
        returned = apply_events(self.clients, r, events)
        if not self.present:
            lost = "; lost: " + "; ".join(f"{k} ({v})" for k, v in self.links.lost.items()) if self.links.lost else ""
            raise RuntimeError(f"round {r}: every client is away; the federation cannot train{lost}")
        downloads: dict[str, int] = {}
        for c in returned:
            if c.name in self.missed:
                downloads[c.name] = self.aggregation.catch_up_bytes(c)
                self.links.post(c, self.aggregation.catch_up_message(c))
                self.missed.discard(c.name)
        reasons = list(self.pending)
        if self.configured_state is not None:
            reasons += resource_changes(*self.configured_state, *self._state_for_trigger())
        reconfigure = bool(reasons) and self.method.split.reconfigures
        if reconfigure:
            for name, b in self.configure(cause="; ".join(reasons)).items():
                downloads[name] = downloads.get(name, 0) + b
        elif reasons and self.configured_state is not None:
            self.configured_state = self._state_for_trigger()
            self.calibrator.pending = []
        for c in self.clients:
            if not c.present:
                self.links.post(c, Away(r))  # keeps a client process's waits short
        return {"reasons": reasons, "reconfigured": reconfigure, "weights_down": downloads}

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
            self.links.post(c, BeginRound(r))
        self.pm.train()
        for _ in range(self.cfg.local_steps):
            calibrates = self.calibrator.due(self.local_step)
            sim += self.clock.step(self.clients, self.method.splits, self._local_step(ledger, losses, calibrates),
                                   calibrates)
            self.local_step += 1
            if not self.present:
                lost = "; ".join(f"{k}: {v}" for k, v in self.links.lost.items())
                raise RuntimeError(f"round {r}, local step {self.step_in_round}: every client is lost ({lost}); the "
                                   "federation cannot go on; start the same command again to resume")
        sim += self.aggregation.aggregate(self.clients, self.links, ledger)
        self.missed |= {c.name for c in self.clients if not c.present}
        self.clock.seconds += sim
        self.wall_time += time.perf_counter() - start
        notes = self.links.take_notes()
        return {"round": r, "train_loss": float(np.mean(losses)), "bytes": ledger.bytes, "reasons": notes}

    def _local_step(self, ledger: Ledger, losses: list, calibrates: bool = False) -> dict[str, int]:
        """One local step of every present client, served in `serve_order`; returns the bytes each moved. The
        server's optimizer steps after each client's batch (one shared set: once per client). IWI rides on the
        step when `calibrates`."""
        present = self.serve_order()
        self.step_in_round += 1
        if self.on_step is not None:
            self.on_step(self.round, self.step_in_round)
        steps = {c.name: Step(self._next_positions(c), calibrates) for c in present}
        for c in present:
            self.links.post(c, steps[c.name])
        step_bytes, scores = {}, {}
        for c in present:
            if not self.method.splits:
                loss = self.links.collect(c, steps[c.name])
                if loss is not None:
                    losses.append(finite(self, float(loss.value), "the training loss", c))
                    step_bytes[c.name] = 0
                continue
            b = self._split_step(c, steps[c.name], losses, scores)
            for kind, v in b.items():
                ledger.add(c.name, kind, v)
            step_bytes[c.name] = sum(b.values())
        if calibrates:
            self.calibrator.fold(scores, {c.name: len(c.indices) for c in self.clients},
                                 self.configured_state is not None)
        return step_bytes

    def _next_positions(self, c: Client) -> list[int]:
        """Client c's next mini-batch: the server keeps every client's data cursor (checkpoints hold it)."""
        return next_indices(c, self.cfg.batch_size, self.cfg.seed, self.clients.index(c))

    def _split_step(self, c: Client, step: Step, losses: list, scores: dict) -> dict[str, int]:
        """Client c's turn in a local step: its smashed data up, the server's stage, the gradient down (and, in a
        calibrating step, both sides' RNGWP into `scores`); returns the bytes by kind."""
        up, calibrates = self.links.collect(c, step), step.calibrate
        if up is None:
            return {}
        smashed, mask, labels = (t.to(self.device) for t in (up.hidden, up.mask, up.labels))
        with self.serving(c), self.calibrator.server_side(self.pm, c.split_point, calibrates) as srv:
            loss, grad = server_update(ServerPart(self.pm, c.split_point), smashed, mask, labels,
                                       self.server_opts.of(SERVER_ADAPTER if self.method.server.shared else c.name))
        losses.append(finite(self, loss.item(), "the training loss", c))
        reply = self.links.ask(c, Backward(grad, scored=calibrates))
        b = {"smashed_up": nbytes(smashed, mask, labels), "grad_down": nbytes(grad)}
        if calibrates and reply is not None:
            scores[c.name] = self.calibrator.client_scores(c.split_point, srv, reply.values,
                                                           lambda v, what: finite(self, v, what, c))
            b["calibration_up"] = nbytes(reply.values)
        return b

    # ---- IWI, evaluation, bookkeeping, checkpoints ----------------------------------------------------

    def global_model(self):
        return self.aggregation.global_model()

    def evaluate_ppl(self, batches) -> float:
        with self.global_model() as model:
            return perplexity(model, batches, self.device)

    def trainable_params(self) -> tuple[int, int]:
        return self.aggregation.trainable_params(self.clients, self.L)

    def state(self) -> dict:
        """Everything needed to resume after this round boundary: each part's state, the clients' records and
        their device optimizers (asked), the random generators."""
        optimizers = {c.name: self.links.ask(c, OptimizerState()) for c in self.clients if not c.excluded}
        return {**self.aggregation.state_dict(), "clients": checkpoint.client_records(self.clients),
                "missed": sorted(self.missed), "calibrator": self.calibrator.state_dict(),
                "local_step": self.local_step, "configured_state": self.configured_state,
                "clock": self.clock.state_dict(), "wall_time": self.wall_time,
                "server_optimizers": self.server_opts.state_dict(),
                "client_optimizers": {n: None if r is None else r.state for n, r in optimizers.items()},
                "rng": checkpoint.rng_state(), "reconfigurations": list(self.reconfigurations)}

    def load_state(self, state: dict) -> None:
        """Restore a state written by `state` into a server built from the same configuration; every client
        gets what it held (`Sync`)."""
        self.missed = set(state["missed"])
        checkpoint.load_client_records(self.clients, state["clients"])
        self.aggregation.load_state_dict(state)
        self.calibrator.load_state_dict(state["calibrator"])
        self.local_step, self.configured_state = state["local_step"], state["configured_state"]
        self.clock.load_state_dict(state["clock"])
        self.wall_time, self.reconfigurations = state["wall_time"], list(state["reconfigurations"])
        self.server_opts.load_state_dict(state["server_optimizers"])
        checkpoint.load_rng_state(state["rng"])
        self.links.mark_lost(self.clients)
        self.open_clients()
        for c in self.clients:
            if not c.excluded:
                self.links.post(c, self.aggregation.sync_message(c, state["client_optimizers"].get(c.name)))

    def finish(self, dump: bool) -> None:
        """End of this method's rounds: live client processes may write their final state (for checks)."""
        for c in self.clients:
            if not c.excluded:
                self.links.post(c, Finish(dump))
