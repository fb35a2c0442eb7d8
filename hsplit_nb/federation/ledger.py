"""The byte ledger and the simulated clock: what each client moved in a round, and how long it took.

Both transports feed the same ledger: the in-process simulation and the multi-process runner count the
same tensors, so a round's bytes and simulated seconds are the same whichever carried them. The clock
charges the spec's latency model (costs.py): a parallel local step takes the slowest of the clients'
device compute plus transfer and the server's sequential compute; transfers at a boundary take the
slowest client's download.
"""
from __future__ import annotations

from ..costs import CALIBRATION_STEP_FACTOR, Dims, block_flops, default_server_speed, head_flops

BYTE_KINDS = ("smashed_up", "grad_down", "adapter_up", "adapter_down", "weights_down", "calibration_up")


def zero_bytes() -> dict[str, int]:
    return dict.fromkeys(BYTE_KINDS, 0)


class Ledger:
    """Bytes per client and kind for one round."""

    def __init__(self, names):
        self.bytes = {n: zero_bytes() for n in names}

    def add(self, client: str, kind: str, n: int) -> None:
        self.bytes[client][kind] += n

    def adapter_bytes(self, client: str) -> int:
        """What a client moves for an aggregation: adapter factors up and down (weights downloaded at the round's
        start are timed there, once)."""
        return sum(v for k, v in self.bytes[client].items() if k.startswith("adapter"))


class Clock:
    """Simulated seconds from the latency model and the bytes counted."""

    def __init__(self, config, batch_size: int, seq_len: int, server_speed: float | None):
        dims = Dims.of(config)
        self.L = dims.n_layers
        self.fb = block_flops(dims, batch_size, seq_len)
        self.hf = head_flops(dims, batch_size, seq_len)
        self.server_speed = server_speed

    def _server_speed(self, clients) -> float:
        return self.server_speed or default_server_speed([c.spec.flops for c in clients])

    def central_step(self, clients, flops_factor: float) -> float:
        """One step of a model trained on the server alone (CenLoRA, FT)."""
        return flops_factor * (self.L * self.fb + self.hf) / self._server_speed(clients)

    def step(self, clients, splits: bool, step_bytes: dict[str, int], calibrates: bool = False) -> float:
        """One parallel local step of the present clients: max(slowest client, server's sequential work); a step
        IWI rides on computes CALIBRATION_STEP_FACTOR as much."""
        server_speed = self._server_speed(clients)
        f = CALIBRATION_STEP_FACTOR if calibrates else 1.0
        times, server = [], 0.0
        for c in clients:
            if not c.present:
                continue
            if splits:
                times.append(f * c.split_point * self.fb / c.spec.flops + step_bytes.get(c.name, 0) / c.spec.bandwidth)
                server += f * ((self.L - c.split_point) * self.fb + self.hf) / server_speed
            else:
                times.append((self.L * self.fb + self.hf) / c.spec.flops)
        return max(max(times, default=0.0), server)

    @staticmethod
    def transfer(clients, bytes_by_client: dict[str, int]) -> float:
        """Seconds until the slowest of the given downloads or uploads has arrived."""
        return max((bytes_by_client[c.name] / c.spec.bandwidth for c in clients if c.name in bytes_by_client),
                   default=0.0)
