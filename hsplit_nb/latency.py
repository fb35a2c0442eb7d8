"""The one time model: how long a local step, a transfer and a round take (the spec's latency model).

c_k = f * s_k * flops_block / F_k + bytes_k / b_k;  S = f * sum_k ((L - s_k) * flops_block + flops_head) / F_server;
T = max(max_k c_k, S), with f = CALIBRATION_STEP_FACTOR in a step IWI rides on, else 1. A round is its steps plus
the slowest client's aggregation traffic (the aggregator's own model of it). ARMSC's search and the federation's clock both ask one `TimeModel`, so
within a federation ARMSC minimises what the clock charges. The bytes a client moves across the cut per step are
the spec's 2 x bytes(smashed) by default; the federation's model counts what its wire moves (the mask and labels
go up beside the smashed data as int64, and a calibrating step's scores as float64).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import candidate_matrices
from .aggregation import AGGREGATORS, Aggregator
from .costs import (
    CALIBRATION_STEP_FACTOR, ClientSpec, Dims, block_flops, default_server_speed, dtype_bytes, head_flops, smashed_bytes,
)

INDEX_BYTES = 8  # the attention mask and the labels cross the cut as int64
SCORE_BYTES = 8  # one float64 RNGWP score per device-side matrix in a calibrating step


@dataclass(frozen=True)
class RoundCosts:
    """What a round costs besides its local steps: the steps' count and the calibrations due in it (each rides on
    one of the steps). ARMSC minimises (local_steps - calibrations) x T(s) + calibrations x T_cal(s) + the slowest
    client's aggregation traffic / b_k, T_cal being T with the compute scaled by CALIBRATION_STEP_FACTOR."""
    local_steps: int
    calibrations: float = 0.0
    server_rank: int = 16  # the rank of the server's shared copy where it joins an aggregation
    aggregator: Aggregator = AGGREGATORS["naa"]  # whose traffic an aggregation moves


@dataclass(frozen=True)
class TimeModel:
    """Built once from the config, the batch, the sequence length, the bytes per value and the server's speed
    (None: 10x the fastest client given); asked for client, server, step, transfer and round times."""
    n_layers: int
    block_flops: float
    head_flops: float
    cut_bytes: int            # what one client moves across the cut in a plain step, up and down
    score_bytes: int          # what a calibrating step adds per device-side matrix (0: not modelled)
    matrices_per_block: int
    server_speed: float | None = None

    @classmethod
    def of(cls, config, batch_size: int, seq_len: int, dtype=torch.float32, server_speed: float | None = None,
           wire: bool = False) -> "TimeModel":
        config = getattr(config, "config", config)
        dims, smashed = Dims.of(config), smashed_bytes(config, batch_size, seq_len, dtype)
        cut = 2 * smashed + (2 * batch_size * seq_len * INDEX_BYTES if wire else 0)
        return cls(dims.n_layers, block_flops(dims, batch_size, seq_len), head_flops(dims, batch_size, seq_len), cut,
                   SCORE_BYTES if wire else 0, len(candidate_matrices(config)) // dims.n_layers, server_speed)

    def server_speed_for(self, specs) -> float:
        return self.server_speed or default_server_speed([c.flops for c in specs])

    def moved(self, split_point: int, calibrates: bool = False) -> int:
        """Bytes one client moves across the cut in a step at `split_point`."""
        return self.cut_bytes + (self.score_bytes * self.matrices_per_block * split_point if calibrates else 0)

    def client(self, split_point: int, spec, moved: int, factor: float = 1.0) -> float:
        return factor * split_point * self.block_flops / spec.flops + moved / spec.bandwidth

    def server(self, splits, server_speed: float, factor: float = 1.0) -> float:
        return factor * sum((self.n_layers - s) * self.block_flops + self.head_flops for s in splits) / server_speed

    def step(self, splits, specs, moved=None, calibrates: bool = False, server_specs=None) -> dict:
        """One parallel local step: {"step", "server", "clients"}. `moved`: bytes per client (default: the model's);
        `server_specs`: the clients the default server speed is taken from (default: `specs`)."""
        f = CALIBRATION_STEP_FACTOR if calibrates else 1.0
        moved = [self.moved(s, calibrates) for s in splits] if moved is None else moved
        clients = [self.client(s, c, b, f) for s, c, b in zip(splits, specs, moved)]
        server = self.server(splits, self.server_speed_for(server_specs or specs), f)
        return {"step": max(max(clients, default=0.0), server), "server": server, "clients": clients}

    def whole_model_step(self, speed: float, factor: float = 1.0) -> float:
        """A step of the whole model on one machine of `speed` FLOP/s (a client of a no-split method, or the server
        alone)."""
        return factor * (self.n_layers * self.block_flops + self.head_flops) / speed

    @staticmethod
    def transfer(bytes_and_bandwidths) -> float:
        """Seconds until the slowest of the given (bytes, bandwidth) transfers has arrived."""
        return max((b / bw for b, bw in bytes_and_bandwidths), default=0.0)

    def round(self, splits, specs, traffic: list[int], costs: RoundCosts, server_specs=None) -> float:
        """A round as the clock charges it: its plain steps, its calibrating steps, and the slowest client's
        aggregation traffic over its bandwidth."""
        plain = self.step(splits, specs, server_specs=server_specs)["step"]
        calibrating = self.step(splits, specs, calibrates=True, server_specs=server_specs)["step"] \
            if costs.calibrations else 0.0
        return (costs.local_steps - costs.calibrations) * plain + costs.calibrations * calibrating + \
            self.transfer((b, c.bandwidth) for b, c in zip(traffic, specs))


def step_latency(config, split_points, speeds, bandwidths, server_speed: float, batch_size: int, seq_len: int,
                 dtype=torch.float32) -> dict:
    """One local step of the whole federation under the spec's model (seconds), for clients of the given speeds
    and bandwidths: {"step", "server", "clients"}."""
    tm = TimeModel.of(config, batch_size, seq_len, dtype, server_speed)
    return tm.step(split_points, [ClientSpec(f"c{k}", 1.0, f, b) for k, (f, b) in enumerate(zip(speeds, bandwidths))])


def round_seconds(config, clients, splits, device_ranks, speeds, server_speed, batch_size, seq_len, p,
                  costs: RoundCosts, matrices=None, time_model: TimeModel | None = None) -> float:
    """The time of one round of ARMSC's plan: `time_model` (default: the spec's, at `server_speed`) over the
    clients at `speeds`, with the aggregation traffic of `device_ranks`."""
    tm = time_model or TimeModel.of(config, batch_size, seq_len, dtype_bytes(p), server_speed)
    specs = [ClientSpec(c.name, c.memory, f, c.bandwidth) for c, f in zip(clients, speeds)]
    traffic = costs.aggregator.traffic(matrices or candidate_matrices(config), device_ranks, splits, costs.server_rank)
    return tm.round(splits, specs, traffic, costs)
