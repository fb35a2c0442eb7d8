"""ARMSC and the baselines' planning rules: split points and ranks from budgets, importance and the cost models.

ARMSC (`plan`) chooses each client's split point for the lowest step time under its memory and then
raises ranks greedily by importance per byte. The baselines' rules live beside it: the weakest client's
split and uniform rank for everyone (`weakest_split`, `uniform_rank`), ranks in budget order without a
split (`budget_order_ranks`), and the strict-memory charge of a whole model (`whole_model_bytes`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import pandas as pd
import torch

from .adapters import Matrix, candidate_matrices, layer_of
from .costs import (
    ADAPTER_COPIES_BYTES, ClientMemory, ClientSpec, Dims, activation_bytes, adapter_bytes, default_server_speed,
    dtype_bytes, matrices_adapter_bytes, uniform_budget, weight_bytes,
)
from .latency import RoundCosts, TimeModel

DEFAULT_RANK_LEVELS = (0, 2, 4, 8, 16)


@dataclass
class ClientPlan:
    name: str
    split_point: int
    ranks: dict[str, int]  # every candidate matrix, device- and server-side
    memory: int            # predicted client bytes
    budget: float
    latency: float         # c_k, seconds per local step
    server_adapter_bytes: int = 0

    def device_ranks(self) -> dict[str, int]:
        return {n: r for n, r in self.ranks.items() if layer_of(n) < self.split_point}

    def server_ranks(self) -> dict[str, int]:
        return {n: r for n, r in self.ranks.items() if layer_of(n) >= self.split_point}


@dataclass
class Plan:
    clients: list[ClientPlan]
    step_latency: float
    server_time: float
    settings: dict = field(default_factory=dict)

    def frame(self) -> pd.DataFrame:
        """One row per client: split point, total device/server rank, memory against budget, latency."""
        return pd.DataFrame([{
            "client": c.name, "split_point": c.split_point, "budget_GB": c.budget / 1e9,
            "memory_GB": c.memory / 1e9, "memory_use": c.memory / c.budget,
            "device_rank_total": sum(c.device_ranks().values()), "server_rank_total": sum(c.server_ranks().values()),
            "device_adapters": sum(r > 0 for r in c.device_ranks().values()),
            "server_adapters": sum(r > 0 for r in c.server_ranks().values()),
            "latency_s": c.latency} for c in self.clients])


def _next_level(levels: tuple[int, ...], r: int) -> int | None:
    higher = [x for x in levels if x > r]
    return min(higher) if higher else None


def _phi(r: int) -> float:
    return math.log2(1 + r)


def _greedy(matrices: list[Matrix], importance: dict[str, float], levels: tuple[int, ...], room: float,
            extra_fn, apply_fn) -> dict[str, int]:
    """Raise the (matrix, next level) with the largest Ibar * (phi(r') - phi(r)) / extra bytes until
    nothing more fits in `room` bytes. Ties go to the earlier matrix (lower layer, then kind order)."""
    ranks = {m.name: 0 for m in matrices}
    order = {m.name: i for i, m in enumerate(matrices)}
    while True:
        best, best_key = None, None
        for m in matrices:
            r_next = _next_level(levels, ranks[m.name])
            if r_next is None:
                continue
            extra, state = extra_fn(m, r_next)
            if extra > room:
                continue
            gain = importance.get(m.name, 0.0) * (_phi(r_next) - _phi(ranks[m.name]))
            key = (gain / max(extra, 1), -order[m.name])
            if best_key is None or key > best_key:
                best, best_key = (m, r_next, extra, state), key
        if best is None:
            return ranks
        m, r_next, extra, state = best
        apply_fn(m, r_next, state)
        ranks[m.name] = r_next
        room -= extra


def _check_inputs(clients, rank_levels, headroom, batch_size=1, seq_len=1, server_speed=None) -> tuple[int, ...]:
    """ARMSC's inputs at the door: errors name the argument (and the client) at fault."""
    levels = tuple(sorted(set(int(r) for r in rank_levels)))
    if not levels or levels[0] != 0 or len(levels) < 2 or any(r < 0 for r in levels):
        raise ValueError(f"rank_levels must contain 0 and at least one positive rank, got {tuple(rank_levels)!r}")
    def number(v, lo, hi, integer=False):
        return not isinstance(v, (bool, str)) and (hasattr(v, "__index__") or not integer) and lo <= v < hi
    for name, v, ok, allowed in (
            ("batch_size", batch_size, number(batch_size, 1, math.inf, True), "a positive integer"),
            ("seq_len", seq_len, number(seq_len, 1, math.inf, True), "a positive integer"),
            ("headroom", headroom, number(headroom, 0, 1), "a number in [0, 1)"),
            ("server_speed", server_speed, server_speed is None or number(server_speed, 1e-300, math.inf), "> 0")):
        if not ok:
            raise ValueError(f"{name} {v!r} is not allowed; {allowed}")
    bad = [k for k, c in enumerate(clients) if not isinstance(c, ClientSpec)]
    if not clients or bad:
        raise ValueError("plan needs at least one client" if not clients else f"clients[{bad[0]}] is "
                         f"{clients[bad[0]]!r}; plan takes ClientSpec(name, memory, speed, bandwidth) per client")
    names = [c.name for c in clients]
    if len(set(names)) != len(names):
        raise ValueError(f"client names must be unique, got {names}")
    return levels


def _importance(matrices, importance) -> dict[str, float]:
    if importance is None:
        return {m.name: 1.0 for m in matrices}
    unknown = set(importance) - {m.name for m in matrices}
    if unknown:
        raise ValueError(f"importance names unknown matrices, e.g. {sorted(unknown)[:3]}")
    return importance


@dataclass
class Problem:
    """One planning: the clients' budgets and speeds, importance (None: uniform), the batch, the rank levels, the
    time model and what a round costs (None: ARMSC minimises one step). The candidates, each client's feasible
    splits and its device ranks at a split are built once, and shared by the split search and the rank plan."""
    config: object
    clients: list
    importance: dict | None
    batch_size: int
    seq_len: int
    levels: tuple
    p: int
    headroom: float
    time: TimeModel
    round_costs: RoundCosts | None = None

    def __post_init__(self):
        self.matrices = candidate_matrices(self.config)
        self.dims = Dims.of(self.config)
        self.importance = _importance(self.matrices, self.importance)
        self._ranks: dict = {}

    @classmethod
    def of(cls, config, clients, importance=None, batch_size: int = 8, seq_len: int = 64,
           rank_levels=DEFAULT_RANK_LEVELS, dtype=torch.float32, headroom: float = 0.1, server_speed=None,
           round_costs: RoundCosts | None = None, time_model: TimeModel | None = None) -> "Problem":
        """A problem from a config and client specs, its inputs checked; the time model is the caller's (a
        federation's, shared with its clock), else the spec's at `server_speed` (default 10x the fastest)."""
        config = getattr(config, "config", config)
        levels = _check_inputs(clients, rank_levels, headroom, batch_size, seq_len, server_speed)
        p = dtype_bytes(dtype)
        tm = time_model or TimeModel.of(config, batch_size, seq_len, p,
                                        server_speed or default_server_speed([c.flops for c in clients]))
        return cls(config, list(clients), importance, batch_size, seq_len, levels, p, headroom, tm, round_costs)

    def at(self, clients, time: TimeModel, round_costs: RoundCosts | None) -> "Problem":
        """The same budgets under other speeds, links or round costs, sharing what depends on budgets alone."""
        if [c.memory for c in clients] != [c.memory for c in self.clients]:
            raise ValueError("Problem.at keeps the budgets; build a new Problem for other budgets")
        other = Problem(self.config, list(clients), self.importance, self.batch_size, self.seq_len, self.levels,
                        self.p, self.headroom, time, round_costs)
        other._ranks, other.__dict__["feasible"] = self._ranks, self.feasible
        return other

    @functools.cached_property
    def feasible(self) -> list[list[int]]:
        """Per client, the split points at which the smallest useful configuration (the lowest positive rank on
        the most important device-side matrix) fits its budget; an error names the first client that fits none."""
        def min_memory(s: int) -> int:
            top = max((m for m in self.matrices if m.layer < s), key=lambda m: (self.importance.get(m.name, 0.0),
                                                                                  -m.layer))
            mem = ClientMemory(self.config, self.dims, s, self.batch_size, self.seq_len, self.p)
            return mem.total() + mem.extra(top, self.levels[1])[0]

        min_mem = {s: min_memory(s) for s in range(1, self.dims.n_layers)}
        out = []
        for c in self.clients:
            fits = [s for s in min_mem if min_mem[s] <= (1 - self.headroom) * c.memory]
            if not fits:
                need = min_mem[1] / (1 - self.headroom)
                raise ValueError(f"client {c.name!r}: budget {c.memory / 1e9:.3f} GB ({c.memory:.0f} bytes) fits no "
                                 f"split point; the smallest budget that fits is {need / 1e9:.3f} GB "
                                 f"({math.ceil(need)} bytes, split point 1 with headroom {self.headroom})")
            out.append(fits)
        return out

    def device_ranks(self, k: int, s: int) -> tuple[dict[str, int], int]:
        """ARMSC's greedy device-side ranks of client k at split s, and its predicted memory (computed once)."""
        if (k, s) not in self._ranks:
            mem = ClientMemory(self.config, self.dims, s, self.batch_size, self.seq_len, self.p)
            room = (1 - self.headroom) * self.clients[k].memory - mem.total()
            ranks = _greedy([m for m in self.matrices if m.layer < s], self.importance, self.levels, room, mem.extra,
                            mem.apply)
            self._ranks[k, s] = (ranks, mem.total())
        return self._ranks[k, s]

    def _sweep(self):
        """ARMSC's candidate split vectors: for each bound T on a client's step time (ascending), every client
        takes its deepest fitting split with c_k <= T."""
        tm, clients, feasible = self.time, self.clients, self.feasible

        def c_time(k: int, s: int) -> float:
            return tm.client(s, clients[k], tm.moved(s))

        for T in sorted({c_time(k, s) for k in range(len(clients)) for s in feasible[k]}):
            yield [max([s for s in feasible[k] if c_time(k, s) <= T * (1 + 1e-12)], default=feasible[k][0])
                   for k in range(len(clients))]

    def seconds(self, splits: list[int]) -> float:
        """What ARMSC minimises for a split vector: a round's time (as the clock charges it) or one step's."""
        if self.round_costs is None:
            return self.time.step(splits, self.clients)["step"]
        costs = self.round_costs
        traffic = costs.aggregator.traffic(self.matrices, [self.device_ranks(k, s)[0] for k, s in enumerate(splits)],
                                           splits, costs.server_rank)
        return self.time.round(splits, self.clients, traffic, costs)

    def splits(self) -> list[int]:
        """The swept vector of the lowest time; ties go to the larger bound, i.e. the deeper splits."""
        best, seen = None, set()
        for splits in self._sweep():
            if tuple(splits) in seen:
                continue
            seen.add(tuple(splits))
            t = self.seconds(splits)
            if best is None or t <= best[0] * (1 + 1e-12):
                best = (t, splits)
        return best[1]

    def check_fixed(self, fixed_split_points) -> list[int]:
        if len(fixed_split_points) != len(self.clients):
            raise ValueError(f"fixed_split_points needs one split per client ({len(self.clients)}), "
                             f"got {len(fixed_split_points)}")
        for k, s in enumerate(fixed_split_points):
            if s not in self.feasible[k]:
                raise ValueError(f"client {self.clients[k].name!r}: fixed split point {s} does not fit its budget "
                                 f"(fitting split points: {self.feasible[k][0]}..{self.feasible[k][-1]})")
        return list(fixed_split_points)

    def plan(self, splits: list[int], server_adapter_budget: float | None = None) -> "Plan":
        """Splits and ranks together: each client's device ranks (computed once), server-side ranks under a
        per-client adapter budget (default: the richest client's device adapters), and the step's timing."""
        device = [self.device_ranks(k, s) for k, s in enumerate(splits)]
        if server_adapter_budget is None:
            richest = max(range(len(self.clients)), key=lambda k: self.clients[k].memory)
            server_adapter_budget = matrices_adapter_bytes(self.matrices, device[richest][0])
        timing = self.time.step(splits, self.clients)
        out = []
        for k, (c, s) in enumerate(zip(self.clients, splits)):
            server = _server_ranks([m for m in self.matrices if m.layer >= s], self.importance, self.levels,
                                   server_adapter_budget)
            ranks = {**device[k][0], **server}
            out.append(ClientPlan(c.name, s, ranks, device[k][1], c.memory, timing["clients"][k],
                                  matrices_adapter_bytes(self.matrices, ranks, range(s, self.dims.n_layers))))
        return Plan(out, timing["step"], timing["server"],
                    {"batch_size": self.batch_size, "seq_len": self.seq_len, "rank_levels": self.levels,
                     "dtype_bytes": self.p, "headroom": self.headroom, "server_speed": self.time.server_speed,
                     "client_speeds": [c.flops for c in self.clients], "server_adapter_budget": server_adapter_budget})


def armsc_splits(config, clients: list[ClientSpec], importance: dict[str, float] | None = None, batch_size: int = 8,
                 seq_len: int = 64, rank_levels=DEFAULT_RANK_LEVELS, dtype=torch.float32, headroom: float = 0.1,
                 server_speed: float | None = None, round_costs: RoundCosts | None = None,
                 time_model: TimeModel | None = None) -> list[int]:
    """ARMSC's split points alone under every client's memory: the lowest time of a round when `round_costs`
    is given (local steps, calibrations and aggregation traffic, as the clock charges them), else the lowest
    step latency (see `plan`)."""
    return Problem.of(config, clients, importance, batch_size, seq_len, rank_levels, dtype, headroom, server_speed,
                      round_costs, time_model).splits()


def _server_ranks(server_side: list[Matrix], importance, levels, budget: float) -> dict[str, int]:
    """Greedy ranks on the server-side matrices within an adapter byte budget."""
    ranks: dict[str, int] = {}

    def s_extra(m, r_new):
        return ADAPTER_COPIES_BYTES * (r_new - ranks.get(m.name, 0)) * m.rank1_cost, None

    def s_apply(m, r_new, _state):
        ranks[m.name] = r_new

    _greedy(server_side, importance, levels, budget, s_extra, s_apply)
    return {m.name: ranks.get(m.name, 0) for m in server_side}


def plan(config, clients: list[ClientSpec], importance: dict[str, float] | None = None, batch_size: int = 8,
         seq_len: int = 64, rank_levels=DEFAULT_RANK_LEVELS, dtype=torch.float32, headroom: float = 0.1,
         server_speed: float | None = None, server_adapter_budget: float | None = None,
         fixed_split_points: list[int] | None = None) -> Plan:
    """ARMSC: split points minimising the step latency under every client's memory, then greedy ranks.

    `importance` maps matrix names to Ibar (None: uniform). `fixed_split_points` skips the split search
    (used by ablations). Returns one ClientPlan per client.
    """
    problem = Problem.of(config, clients, importance, batch_size, seq_len, rank_levels, dtype, headroom, server_speed)
    splits = problem.splits() if fixed_split_points is None else problem.check_fixed(fixed_split_points)
    return problem.plan(splits, server_adapter_budget)


def shared_server_ranks(server_side: list[Matrix], importance: dict[str, float] | None, rank_levels,
                        budget: float | None) -> dict[str, int]:
    """Ranks of the main server's one shared adapter set from the server's own budget (bytes of adapter weight,
    grad and Adam moments): by default the top rank level on every server-side matrix; under a smaller budget
    the same greedy by importance per byte as the devices. Client budgets never limit it."""
    levels = tuple(sorted(set(int(r) for r in rank_levels)))
    if budget is None:
        return {m.name: levels[-1] for m in server_side}
    if not budget >= 0:
        raise ValueError(f"server_adapter_budget must be a non-negative number of bytes, got {budget!r}")
    return _server_ranks(server_side, importance or {m.name: 1.0 for m in server_side}, levels, budget)


# ---- the baselines' rules -------------------------------------------------------------------------

def every_matrix(config, rank: int) -> dict[str, int]:
    """One rank on every candidate matrix."""
    return {m.name: rank for m in candidate_matrices(config)}


def _uniform_fits(config, split_point: int, rank: int, batch_size, seq_len, p, room) -> bool:
    return uniform_budget(config, split_point, rank, batch_size, seq_len, headroom=0.0, dtype=p) <= room


def weakest_split(config, clients: list[ClientSpec], batch_size: int = 8, seq_len: int = 64,
                  rank_levels=DEFAULT_RANK_LEVELS, dtype=torch.float32, headroom: float = 0.1,
                  server_speed: float | None = None, time_model: TimeModel | None = None) -> int:
    """SplitLoRA's split for everyone: ARMSC's latency choice for a federation of copies of the weakest client,
    or the deepest shallower split where the weakest budget fits a uniform rank."""
    config = getattr(config, "config", config)
    p = dtype_bytes(dtype)
    levels = _check_inputs(clients, rank_levels, headroom, batch_size, seq_len, server_speed)
    weakest = min(clients, key=lambda c: c.memory)
    copies = [ClientSpec(c.name, weakest.memory, weakest.flops, weakest.bandwidth) for c in clients]
    s0 = min(armsc_splits(config, copies, None, batch_size, seq_len, levels, p, headroom, server_speed,
                          time_model=time_model))
    room = (1 - headroom) * weakest.memory
    positive = [lv for lv in levels if lv > 0]
    for s in range(s0, 0, -1):
        if _uniform_fits(config, s, positive[0], batch_size, seq_len, p, room):
            return s
    raise ValueError(f"the weakest budget ({weakest.memory:.0f} bytes) fits no uniform rank {positive} "
                     f"at any split point")


def uniform_rank(config, memory: float, split_point: int, batch_size: int = 8, seq_len: int = 64,
                 rank_levels=DEFAULT_RANK_LEVELS, dtype=torch.float32, headroom: float = 0.1) -> int:
    """The largest rank level that a budget of `memory` bytes fits on every matrix at `split_point`."""
    config = getattr(config, "config", config)
    room, p = (1 - headroom) * memory, dtype_bytes(dtype)
    positive = [lv for lv in sorted(set(rank_levels)) if lv > 0]
    for r in reversed(positive):
        if _uniform_fits(config, split_point, r, batch_size, seq_len, p, room):
            return r
    raise ValueError(f"a budget of {memory:.0f} bytes fits no uniform rank {positive} at split point {split_point}")


def budget_order_ranks(clients: list[ClientSpec], rank_levels=DEFAULT_RANK_LEVELS) -> dict[str, int]:
    """HetLoRA-style ranks: the positive rank levels spread over the clients in budget order (all clients,
    present or not, so a client keeps its rank when others leave). Clients with equal budgets share the rank of
    the highest place among them: in a homogeneous federation every client gets the top rank."""
    positive = [lv for lv in sorted(set(rank_levels)) if lv > 0]
    memories = sorted(c.memory for c in clients)
    k = len(memories)
    place = {m: i for i, m in enumerate(memories)}  # the last (highest) place of each budget
    return {c.name: positive[round(place[c.memory] * (len(positive) - 1) / max(k - 1, 1))] for c in clients}


def whole_model_bytes(config, ranks: dict[str, int], batch_size: int, seq_len: int, dtype=torch.float32) -> int:
    """The strict-memory charge of a no-split client: frozen weights, adapters, activations of every block
    and the logits."""
    config = getattr(config, "config", config)
    dims, p = Dims.of(config), dtype_bytes(dtype)
    return weight_bytes(config, p) + adapter_bytes(config, ranks) + \
        activation_bytes(config, dims.n_layers, ranks, batch_size, seq_len, p) + batch_size * seq_len * dims.vocab * 4
