"""The regime map: where HSplitLoRA can differ from SplitLoRA at all, from configs alone (no training).

For every point of a sweep (the server's speed as a multiple of the fastest client's, the link bandwidth, the
local steps per round, the budgets), each method's planning rule runs as at the first configuration (uniform
importance) and the cost model prices its step and its round exactly as the clock charges them. One tidy row per
(point, method): split points, device adapters and ranks, step and round time; `round_vs_splitlora` is
HSplitLoRA's round time over SplitLoRA's at the same point.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pandas as pd
from tqdm.auto import tqdm

from . import planner
from .adapters import layer_of
from .aggregation import AGGREGATORS
from .costs import FLOPS_PER_BUDGET_BYTE, ClientSpec, dtype_bytes
from .latency import RoundCosts, TimeModel, round_seconds, step_latency

METHODS = ("hsplitlora", "splitlora")
SPLITLORA_AGGREGATOR = "fedavg"  # SplitLoRA's rule in the method table (a test holds them equal)


@dataclass(frozen=True)
class Fixed:
    """What stays fixed across a map: the model, the batch, the rank levels, the headroom, IWI's interval."""
    config: object
    batch_size: int = 4
    seq_len: int = 96
    rank_levels: tuple = planner.DEFAULT_RANK_LEVELS
    headroom: float = 0.1
    iwi_interval: int | None = None  # None: one calibration per round
    flops_per_budget_byte: float = FLOPS_PER_BUDGET_BYTE
    dtype_bytes: int = 4


class _Budgets:
    """One budget set's clients and ARMSC's problem over them: the feasible splits and the device ranks of each
    client at each split are built once (they do not depend on speeds or round length, and computing them is
    most of a plan's cost) and shared by every point of the map."""

    def __init__(self, fixed: Fixed, budgets: list[float]):
        self.fixed, self.budgets = fixed, list(budgets)
        self.levels = tuple(sorted(set(fixed.rank_levels)))
        self.problem = planner.Problem.of(fixed.config, self.specs(1e8), None, fixed.batch_size, fixed.seq_len,
                                          self.levels, fixed.dtype_bytes, fixed.headroom)
        self.matrices = self.problem.matrices

    def specs(self, bandwidth: float) -> list[ClientSpec]:
        f = self.fixed.flops_per_budget_byte
        return [ClientSpec(f"c{k}", b, f * b, bandwidth) for k, b in enumerate(self.budgets)]


def _row(b: _Budgets, method: str, splits: list[int], ranks: list[dict], specs, server: float, costs: RoundCosts):
    fx = b.fixed
    speeds = [c.flops for c in specs]
    step = step_latency(fx.config, splits, speeds, [c.bandwidth for c in specs], server, fx.batch_size, fx.seq_len,
                        fx.dtype_bytes)["step"]
    device = [{n: r for n, r in rk.items() if r and layer_of(n) < s} for rk, s in zip(ranks, splits)]
    return {"method": method, "splits": "/".join(map(str, splits)), "mean_split": sum(splits) / len(splits),
            "distinct_splits": len(set(splits)), "device_adapters": "/".join(str(len(d)) for d in device),
            "device_rank_total": "/".join(str(sum(d.values())) for d in device), "step_s": step,
            "round_s": round_seconds(fx.config, specs, splits, ranks, speeds, server, fx.batch_size, fx.seq_len,
                                     fx.dtype_bytes, costs, b.matrices)}


def _point(b: _Budgets, server_ratio: float, bandwidth: float, local_steps: int) -> list[dict]:
    fx = b.fixed
    specs = b.specs(bandwidth)
    server = server_ratio * max(c.flops for c in specs)
    calibrations = local_steps / (fx.iwi_interval or local_steps)
    h_costs = RoundCosts(local_steps, calibrations, b.levels[-1])
    problem = b.problem.at(specs, TimeModel.of(fx.config, fx.batch_size, fx.seq_len, fx.dtype_bytes, server), h_costs)
    h_splits = problem.splits()
    h_ranks = [problem.device_ranks(k, s)[0] for k, s in enumerate(h_splits)]
    s = planner.weakest_split(fx.config, specs, fx.batch_size, fx.seq_len, b.levels, fx.dtype_bytes, fx.headroom,
                              server)
    r = planner.uniform_rank(fx.config, min(b.budgets), s, fx.batch_size, fx.seq_len, b.levels, fx.dtype_bytes,
                             fx.headroom)
    s_ranks = [planner.every_matrix(fx.config, r)] * len(specs)
    rows = [_row(b, "hsplitlora", h_splits, h_ranks, specs, server, h_costs),
            _row(b, "splitlora", [s] * len(specs), s_ranks, specs, server,
                 RoundCosts(local_steps, 0.0, r, AGGREGATORS[SPLITLORA_AGGREGATOR]))]
    point = {"server_ratio": server_ratio, "server_flops": server, "bandwidth": bandwidth, "local_steps": local_steps}
    rows = [{**point, **x} for x in rows]
    ratio = rows[0]["round_s"] / rows[1]["round_s"]
    return [{**x, "round_vs_splitlora": ratio} for x in rows]


def regime_map(config, budgets: dict[str, list[float]], server_ratios=(2, 5, 10, 50), bandwidths=(1e7, 1e8, 1e9),
               local_steps=(1, 2, 5, 10, 20, 50), progress: bool = True, **fixed) -> pd.DataFrame:
    """Sweep the server's speed (x the fastest client), the bandwidth (bytes/s), the local steps per round and the
    budget sets (name -> bytes per client); one row per point and method (see the module docstring). `fixed`:
    the fields of `Fixed` (batch_size, seq_len, rank_levels, headroom, iwi_interval, flops_per_budget_byte)."""
    config = getattr(config, "config", config)
    fx = Fixed(config, **fixed)
    fx = Fixed(**{**fx.__dict__, "dtype_bytes": dtype_bytes(fx.dtype_bytes)})
    rows = []
    grid = list(itertools.product(budgets.items(), server_ratios, bandwidths, local_steps))
    cache: dict[str, _Budgets] = {}
    for (name, bs), ratio, bw, steps in tqdm(grid, desc="regime map", disable=not progress):
        if name not in cache:
            cache[name] = _Budgets(fx, bs)
        rows += [{"budgets": name, **x} for x in _point(cache[name], ratio, bw, steps)]
    return pd.DataFrame(rows)
