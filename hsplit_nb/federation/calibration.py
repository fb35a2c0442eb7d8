"""IWI on the federation: RNGWP calibrations by the split protocol, one batch per present client.

The server scores its blocks on the smashed data a client sends up and sends the smashed data's gradient
down; the client scores its own blocks and sends one float64 score per matrix up. The scores, averaged with
data weights, feed the importance tracker; its trigger marks a reconfiguration for the next boundary.
"""
from __future__ import annotations

from ..importance import scoring, server_scores, side_matrices
from ..split import ServerPart
from .clients import Client
from .divergence import finite
from .ledger import calibration_bytes


def calibrate(server) -> dict[str, int]:
    """One calibration of every present client, folded into the tracker; returns the bytes each client moved
    (for the clock)."""
    if not server.method.splits:
        raise ValueError(f"method {server.method.name!r}: IWI calibration needs a split")
    present = server.present
    for c in present:
        server.ask(c, "begin_calibration", c.split_point, server.calibrations)
    total = sum(len(c.indices) for c in present)
    scores = {m.name: 0.0 for m in server.matrices}
    moved = {}
    for c in present:
        before = sum(server.calibration_ledger.bytes[c.name].values())
        for n, v in (client_rngwp(server, c) or {}).items():
            scores[n] += len(c.indices) / total * v
        moved[c.name] = sum(server.calibration_ledger.bytes[c.name].values()) - before
    server.tracker.update(scores)
    server.calibrations += 1
    if server.configured_state is not None:
        server.pending = server.tracker.trigger()  # importance only; resources are checked at the boundary
    return moved


def client_rngwp(server, c: Client) -> dict[str, float] | None:
    """RNGWP of every matrix on client c's calibration batch (None if the client was lost meanwhile)."""
    split = c.split_point
    up = server.ask(c, "calibration_forward")
    if up is None:
        return None
    smashed, mask, labels = (t.to(server.device) for t in up)
    srv = side_matrices(server.config, split, "server")
    with server.serving(c), scoring(server.pm, [m.name for m in srv]) as weights:
        scores, grad = server_scores(ServerPart(server.pm, split), smashed, mask, labels, srv, weights)
    values = server.ask(c, "calibration_backward", grad)
    if values is None:
        return None
    cli = side_matrices(server.config, split, "client")
    scores.update({m.name: float(v) for m, v in zip(cli, values.tolist())})
    up_bytes, down_bytes = calibration_bytes(smashed, mask, labels, grad, len(cli))
    server.calibration_ledger.add(c.name, "calibration_up", up_bytes)
    server.calibration_ledger.add(c.name, "calibration_down", down_bytes)
    return {m.name: finite(server, scores[m.name], f"the RNGWP score of {m.name}", c) for m in server.matrices}
