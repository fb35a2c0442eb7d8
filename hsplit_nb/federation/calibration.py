"""IWI on the federation: RNGWP calibrations that ride on an ordinary local step.

Every `iwi_interval` local steps (the first included) the step calibrates: the server scores the blocks it
runs for each client from that client's own batch, and each client scores its blocks in its own backward and
sends one float64 score per matrix up. The adapters' update of the step is what it would have been. The
scores, averaged with data weights, feed the importance tracker; its trigger marks a reconfiguration for the
next boundary.
"""
from __future__ import annotations

import contextlib

from ..importance import ImportanceTracker, riding, side_matrices


class Calibrator:
    """The calibrations of one federation and the importance tracker they feed (None: the method runs without
    IWI). `pending`: the trigger's reasons, waiting for the next boundary."""

    def __init__(self, config, matrices, interval: int, tracker: ImportanceTracker | None):
        self.config, self.matrices, self.interval, self.tracker = config, matrices, interval, tracker
        self.count = 0
        self.pending: list[str] = []

    @property
    def ready(self) -> bool:
        """Whether importance is known (ARMSC plans with uniform importance before)."""
        return self.tracker is not None and self.tracker.ready

    def due(self, local_step: int) -> bool:
        """Whether the local step about to run calibrates."""
        return self.tracker is not None and local_step % self.interval == 0

    def server_side(self, pm, split_point: int, calibrate: bool):
        """The hooks that score a client's server part during its step (nothing when the step does not calibrate)."""
        if not calibrate:
            return contextlib.nullcontext({})
        return riding(pm, side_matrices(self.config, split_point, "server"))

    def client_scores(self, split_point: int, server: dict[str, float], values, check) -> dict[str, float]:
        """Every matrix's RNGWP on one client's batch: the server's scores and the client's uploaded values;
        `check(value, what)` stops the run on a non-finite score."""
        cli = side_matrices(self.config, split_point, "client")
        scores = {**server, **{m.name: float(v) for m, v in zip(cli, values.tolist())}}
        return {m.name: check(scores[m.name], f"the RNGWP score of {m.name}") for m in self.matrices}

    def fold(self, by_client: dict[str, dict[str, float]], data: dict[str, int], configured: bool) -> None:
        """One calibration: the clients' scores averaged with their data sizes, into the tracker; the trigger is
        read once a configuration exists (importance only; resources are checked at the boundary)."""
        if not by_client:
            return
        total = sum(data[n] for n in by_client)
        self.tracker.update({m.name: sum(data[n] / total * s[m.name] for n, s in by_client.items())
                             for m in self.matrices})
        self.count += 1
        if configured:
            self.pending = self.tracker.trigger() if self.tracker.has_configuration else \
                [f"first importance (calibration {self.count - 1}; the plan so far had uniform importance)"]

    def state_dict(self) -> dict:
        return {"count": self.count, "pending": list(self.pending),
                "tracker": None if self.tracker is None else self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.pending = state["count"], list(state["pending"])
        if self.tracker is not None and state["tracker"] is not None:
            self.tracker.load_state_dict(state["tracker"])
