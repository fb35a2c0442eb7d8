"""Methods as rows of one table: each names the behaviour objects it is made of.

A method is a split policy (where each client's part ends), a rank policy (which adapters, at which rank),
a server-side adapter policy, an aggregator (aggregation.py), and whether IWI calibrates. As in peft's
PEFT_TYPE_TO_CONFIG_MAPPING, a name maps to behaviour objects here and nowhere else: the engine asks the
objects (`method.split.splits`, `method.aggregator.merges`, ...), never compares names. The planning rules
themselves live in planner.py, beside ARMSC.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from . import planner
from .adapters import candidate_matrices, layer_of
from .aggregation import AGGREGATORS, Aggregator


@dataclass(frozen=True)
class PlanInputs:
    """What a planning rule sees at a round boundary."""
    config: object               # the model's transformers config
    specs: list                  # ClientSpec of each present client, in client order
    all_specs: list              # ClientSpec of every client (present or not)
    levels: tuple[int, ...]
    batch_size: int
    seq_len: int
    dtype_bytes: int
    headroom: float
    server_speed: float | None
    importance: dict | None      # Ibar per matrix, None for uniform
    fixed_splits: list | None    # fixed split point per present client (config `split_points`), or None
    n_blocks: int
    server_adapter_budget: float | None = None  # bytes for the main server's shared adapter set (None: top rank)
    round_costs: object = None   # latency.RoundCosts: ARMSC minimises a round's time (None: one step's)
    time: object = None          # latency.TimeModel the federation's clock charges (None: the spec's at server_speed)

    @functools.cached_property
    def problem(self) -> planner.Problem:
        """ARMSC's one problem for this boundary, shared by the split and the rank policy."""
        return planner.Problem.of(self.config, self.specs, self.importance, self.batch_size, self.seq_len,
                                  self.levels, self.dtype_bytes, self.headroom, self.server_speed, self.round_costs,
                                  self.time)


@dataclass(frozen=True)
class SplitPolicy:
    """Where each present client's part ends: `choose(inputs) -> [split point per present client]`."""
    name: str
    federated: bool              # False: one model trained on the pooled data (CenLoRA, FT)
    splits: bool                 # the model is cut between each client and the main server
    reconfigures: bool           # replans at a boundary when importance shifts or resources change
    choose: Callable | None = None


@dataclass(frozen=True)
class RankPolicy:
    """Which matrices carry adapters and at which rank: `choose(inputs, splits) -> [{matrix: rank}]` for the
    clients, `server(inputs, ranks, server_matrices) -> {matrix: rank}` for the main server's shared set."""
    name: str
    adapters: bool = True        # False: full fine-tuning, every weight trains
    step_flops_factor: float = 1.0  # compute of a step relative to LoRA's (FT also computes weight gradients)
    choose: Callable | None = None
    server: Callable | None = None


@dataclass(frozen=True)
class ServerAdapterPolicy:
    """Whose adapters the server holds on the layers past a client's split: one shared set that the main server
    updates after each client's batch (the default of every split method), or one copy per client averaged
    at aggregation (the SFL-V1 schedule, kept as a named variant)."""
    name: str
    shared: bool

    def planned(self, x: "PlanInputs", splits: list[int], ranks: list[dict[str, int]], rank_policy: "RankPolicy"):
        """Each client's plan as its own adapter will hold it. Per client, the server-side copy takes the ranks the
        shared set would have there (from the server's budget, never the client's), so that this variant
        changes the server schedule alone, not also the server's adapter capacity."""
        if self.shared or rank_policy.server is None:
            return ranks
        matrices = candidate_matrices(x.config)
        return [{**{n: r for n, r in rk.items() if layer_of(n) < s},
                 **rank_policy.server(x, ranks, [m for m in matrices if m.layer >= s])} for s, rk in zip(splits, ranks)]

    def client_ranks(self, ranks: dict[str, int], split_point: int) -> dict[str, int]:
        """The ranks of a client's own adapter: every matrix, or only its device side when the server's are shared."""
        if not self.shared:
            return dict(ranks)
        return {n: r for n, r in ranks.items() if layer_of(n) < split_point}


def _armsc_splits(x: PlanInputs) -> list[int]:
    return list(x.fixed_splits) if x.fixed_splits is not None else x.problem.splits()


def _armsc_ranks(x: PlanInputs, splits) -> list[dict[str, int]]:
    return [cp.ranks for cp in x.problem.plan(x.problem.check_fixed(list(splits))).clients]


def _armsc_server_ranks(x: PlanInputs, ranks, server_side) -> dict[str, int]:
    return planner.shared_server_ranks(server_side, x.importance, x.levels, x.server_adapter_budget)


def _uniform_server_ranks(x: PlanInputs, ranks, server_side) -> dict[str, int]:
    r = max(ranks[0].values())  # SplitLoRA: the server's set at the same uniform rank as the devices
    return {m.name: r for m in server_side}


def _weakest_split(x: PlanInputs) -> list[int]:
    s = planner.weakest_split(x.config, x.specs, x.batch_size, x.seq_len, x.levels, x.dtype_bytes, x.headroom,
                              x.server_speed, x.time)
    return [s] * len(x.specs)


def _uniform_ranks(x: PlanInputs, splits) -> list[dict[str, int]]:
    r = planner.uniform_rank(x.config, min(s.memory for s in x.specs), splits[0], x.batch_size, x.seq_len, x.levels,
                             x.dtype_bytes, x.headroom)
    return [planner.every_matrix(x.config, r)] * len(x.specs)


def _budget_order_ranks(x: PlanInputs, splits) -> list[dict[str, int]]:
    rank_of = planner.budget_order_ranks(x.all_specs, x.levels)
    return [planner.every_matrix(x.config, rank_of[s.name]) for s in x.specs]


ARMSC_SPLIT = SplitPolicy("armsc", federated=True, splits=True, reconfigures=True, choose=_armsc_splits)
# the split-1 control: ARMSC's ranks and IWI, every client at split point 1 (separates the split choice)
SPLIT_ONE = SplitPolicy("split-1", federated=True, splits=True, reconfigures=True, choose=lambda x: [1] * len(x.specs))
WEAKEST_SPLIT = SplitPolicy("weakest", federated=True, splits=True, reconfigures=True, choose=_weakest_split)
NO_SPLIT = SplitPolicy("none", federated=True, splits=False, reconfigures=False,
                       choose=lambda x: [x.n_blocks] * len(x.specs))
CENTRAL = SplitPolicy("central", federated=False, splits=False, reconfigures=False)

ARMSC_RANKS = RankPolicy("armsc", choose=_armsc_ranks, server=_armsc_server_ranks)
UNIFORM_RANKS = RankPolicy("weakest", choose=_uniform_ranks, server=_uniform_server_ranks)
# the no-ARMSC ablation: uniform device ranks at the weakest client's level, the server's own set as HSplitLoRA's
UNIFORM_DEVICE_RANKS = RankPolicy("weakest-device", choose=_uniform_ranks, server=_armsc_server_ranks)
BUDGET_ORDER_RANKS = RankPolicy("budget-order", choose=_budget_order_ranks)
MAX_RANKS = RankPolicy("max")
FULL_FINE_TUNING = RankPolicy("full", adapters=False, step_flops_factor=1.5)

PER_CLIENT_SERVER = ServerAdapterPolicy("per-client", shared=False)
SHARED_SERVER = ServerAdapterPolicy("shared", shared=True)


@dataclass(frozen=True)
class Method:
    name: str
    split: SplitPolicy
    ranks: RankPolicy
    iwi: bool = False                      # RNGWP calibrations feed ARMSC
    aggregator: Aggregator | None = AGGREGATORS["naa"]
    server: ServerAdapterPolicy = PER_CLIENT_SERVER
    hetlora_lambda: float = 0.0            # weight of HetLoRA's self-pruning regulariser
    strict_memory: bool = False            # no-split methods: charge the whole model, leave out clients it does not fit
    description: str = ""

    @property
    def splits(self) -> bool:
        return self.split.splits

    @property
    def federated(self) -> bool:
        return self.split.federated


_A = AGGREGATORS
_S = SHARED_SERVER
METHODS = {m.name: m for m in [
    Method("hsplitlora", ARMSC_SPLIT, ARMSC_RANKS, iwi=True, server=_S, description="HSplitLoRA: IWI + ARMSC + NAA"),
    Method("splitlora", WEAKEST_SPLIT, UNIFORM_RANKS, aggregator=_A["fedavg"], server=_S,
           description="SplitLoRA: weakest client's split and rank, shared server adapters, FedAvg"),
    Method("hetlora", NO_SPLIT, BUDGET_ORDER_RANKS, aggregator=_A["hetlora"], hetlora_lambda=1e-3,
           description="HetLoRA: no split, ranks by budget, zero-pad + norm-weighted aggregation"),
    Method("hetlora-strict", NO_SPLIT, BUDGET_ORDER_RANKS, aggregator=_A["hetlora"], hetlora_lambda=1e-3,
           strict_memory=True, description="HetLoRA charged the whole model: clients that cannot hold it stay out"),
    Method("cenlora", CENTRAL, MAX_RANKS, description="Centralised LoRA on pooled data (reference)"),
    Method("ft", CENTRAL, FULL_FINE_TUNING, aggregator=None, description="Full fine-tuning on pooled data (reference)"),
    Method("hsplitlora-no-iwi", ARMSC_SPLIT, ARMSC_RANKS, server=_S, description="ablation: uniform importance"),
    # without ARMSC nothing consumes importance, so no calibrations are spent
    Method("hsplitlora-no-armsc", WEAKEST_SPLIT, UNIFORM_DEVICE_RANKS, server=_S,
           description="ablation: weakest client's split and rank on every device; the server's set from its budget"),
    Method("hsplitlora-no-naa", ARMSC_SPLIT, ARMSC_RANKS, iwi=True, aggregator=_A["zeropad"], server=_S,
           description="ablation: zero-pad and average A and B instead of NAA"),
    Method("hsplitlora-split-1", SPLIT_ONE, ARMSC_RANKS, iwi=True, server=_S,
           description="control: HSplitLoRA with every client at split point 1"),
    Method("hsplitlora-per-client-server", ARMSC_SPLIT, ARMSC_RANKS, iwi=True, server=PER_CLIENT_SERVER,
           description="ablation: one server-side adapter copy per client, averaged by NAA (SFL-V1)"),
    Method("flora", NO_SPLIT, BUDGET_ORDER_RANKS, aggregator=_A["flora"], description="FLoRA: stacking, no split"),
    Method("flexlora", NO_SPLIT, BUDGET_ORDER_RANKS, aggregator=_A["flexlora"],
           description="FlexLoRA: averaged deltas, SVD, per-client truncation, no split"),
]}

PAPER_METHODS = ["hsplitlora", "splitlora", "hetlora", "cenlora", "ft"]
ABLATIONS = ["hsplitlora-no-iwi", "hsplitlora-no-armsc", "hsplitlora-no-naa", "hsplitlora-per-client-server"]
CONTROLS = ["hsplitlora-split-1"]
EXTRAS = ["hetlora-strict", "flora", "flexlora"]


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]
