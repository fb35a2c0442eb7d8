"""The federation's simulated clock: it charges the time model (latency.py) for what each round did, the same
model ARMSC plans with, and keeps the simulated seconds so far."""
from __future__ import annotations

from ..latency import TimeModel


class Clock:
    """Simulated seconds of one federation, charged from its `TimeModel` and the bytes counted."""

    def __init__(self, time: TimeModel):
        self.time = time
        self.seconds = 0.0

    def step(self, clients, splits: bool, step_bytes: dict[str, int], calibrates: bool = False) -> float:
        """One parallel local step of the present clients: max(slowest client, server's sequential work); a step
        IWI rides on computes CALIBRATION_STEP_FACTOR as much. The default server speed is the fastest client's
        of all (present or not)."""
        present = [c for c in clients if c.present]
        if not splits:
            return max((self.time.whole_model_step(c.spec.flops) for c in present), default=0.0)
        return self.time.step([c.split_point for c in present], [c.spec for c in present],
                              [step_bytes.get(c.name, 0) for c in present], calibrates,
                              server_specs=[c.spec for c in clients])["step"]

    def central_step(self, clients, flops_factor: float) -> float:
        """One step of a model trained on the server alone (CenLoRA, FT)."""
        return self.time.whole_model_step(self.time.server_speed_for([c.spec for c in clients]), flops_factor)

    @staticmethod
    def transfer(clients, bytes_by_client: dict[str, int]) -> float:
        """Seconds until the slowest of the given clients' downloads or uploads has arrived."""
        return TimeModel.transfer((bytes_by_client[c.name], c.spec.bandwidth) for c in clients
                                  if c.name in bytes_by_client)

    def state_dict(self) -> dict:
        return {"seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.seconds = float(state["seconds"])
