"""IWI on the federation: RNGWP calibrations that ride on an ordinary local step.

Every `iwi_interval` local steps (the first included) the step calibrates: the server scores the blocks it
runs for each client from that client's own batch, and each client scores its blocks in its own backward and
sends one float64 score per matrix up. The adapters' update of the step is what it would have been. The
scores, averaged with data weights, feed the importance tracker; its trigger marks a reconfiguration for the
next boundary.
"""
from __future__ import annotations

import contextlib

from ..importance import riding, side_matrices
from .clients import Client
from .divergence import finite


def due(server) -> bool:
    """Whether the local step about to run calibrates."""
    return server.tracker is not None and server.local_step % server.cfg.iwi_interval == 0


def server_side(server, c: Client, calibrate: bool):
    """The hooks that score client c's server part during its step (nothing when the step does not calibrate)."""
    if not calibrate:
        return contextlib.nullcontext({})
    return riding(server.pm, side_matrices(server.config, c.split_point, "server"))


def client_scores(server, c: Client, srv: dict[str, float], values) -> dict[str, float]:
    """Every matrix's RNGWP on client c's batch: the server's scores and the client's uploaded values."""
    cli = side_matrices(server.config, c.split_point, "client")
    scores = {**srv, **{m.name: float(v) for m, v in zip(cli, values.tolist())}}
    return {m.name: finite(server, scores[m.name], f"the RNGWP score of {m.name}", c) for m in server.matrices}


def fold(server, by_client: dict[str, dict[str, float]]) -> None:
    """One calibration: the clients' scores averaged with data weights, into the tracker; the trigger is read."""
    if not by_client:
        return
    total = sum(len(server.clients_by_name[n].indices) for n in by_client)
    scores = {m.name: sum(len(server.clients_by_name[n].indices) / total * s[m.name] for n, s in by_client.items())
              for m in server.matrices}
    server.tracker.update(scores)
    server.calibrations += 1
    if server.configured_state is not None:  # importance only; resources are checked at the boundary
        server.pending = server.tracker.trigger() if server.tracker.has_configuration else \
            [f"first importance (calibration {server.calibrations - 1}; the plan so far had uniform importance)"]
