"""A main server's state at a round boundary, for atomic per-round checkpoints and an identical resume."""
from __future__ import annotations

import random

import numpy as np
import torch

from ..adapters import adapter_names, layer_of, read_adapter, write_adapter
from ..aggregation import Stacked
from ..costs import ClientSpec
from .messages import OptimizerState, Sync


def client_records(clients) -> list[dict]:
    return [{"split_point": c.split_point, "ranks": c.ranks, "present": c.present, "excluded": c.excluded,
             "epoch": c.epoch, "pos": c.pos, "memory": c.spec.memory} for c in clients]


def load_client_records(clients, records) -> None:
    for c, s in zip(clients, records):
        c.split_point, c.ranks, c.present, c.excluded, c.epoch, c.pos = s["split_point"], s["ranks"], \
            s["present"], s["excluded"], s["epoch"], s["pos"]
        c.spec = ClientSpec(c.spec.name, s["memory"], c.spec.speed, c.spec.bandwidth)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def load_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def adapters_state(replica) -> dict:
    return {adapter: {n: read_adapter(replica.pm, n, adapter) for n in adapter_names(replica.pm, adapter)}
            for adapter in replica.adapters()}


def server_state(server) -> dict:
    """Everything needed to resume after this round boundary (see `load_server_state`)."""
    return {
        "touched": {n: w.clone() for n, w in server.replica.weights(sorted(server.touched)).items()},
        "clients": client_records(server.clients),
        "missed": sorted(server.missed),
        "adapters": adapters_state(server.replica),
        "global_deltas": {n: (st.B, st.A) for n, st in server.global_deltas.items()},
        "calibrator": server.calibrator.state_dict(), "local_step": server.local_step,
        "generation": server.generation, "last_reset": dict(server.last_reset),
        "configured_state": server.configured_state, "clock": server.clock.state_dict(), "wall_time": server.wall_time,
        "server_optimizers": server.server_opts.state_dict(),
        "client_optimizers": {c.name: _optimizer_state(server, c) for c in server.clients if not c.excluded},
        "rng": rng_state(), "reconfigurations": list(server.reconfigurations),
    }


def load_server_state(server, state: dict) -> None:
    """Restore a state written by `server_state` into a server built from the same configuration; client
    processes get what they held (`Sync`)."""
    server.missed = set(state["missed"])
    load_client_records(server.clients, state["clients"])
    for adapter, mats in state["adapters"].items():
        server.replace_adapter(adapter, {n: f.rank for n, f in mats.items()})
        for n, f in mats.items():
            write_adapter(server.pm, n, f.A, f.B, adapter)
    server.replica.load_weights(state["touched"])
    server.touched = set(state["touched"])
    server.global_deltas = {n: Stacked(B, A) for n, (B, A) in state["global_deltas"].items()}
    server.calibrator.load_state_dict(state["calibrator"])
    server.local_step = state["local_step"]
    server.generation, server.last_reset = state["generation"], dict(state["last_reset"])
    server.configured_state = state["configured_state"]
    server.clock.load_state_dict(state["clock"])
    server.wall_time = state["wall_time"]
    server.reconfigurations = list(state["reconfigurations"])
    server.server_opts.load_state_dict(state["server_optimizers"])
    load_rng_state(state["rng"])
    server.links.mark_lost(server.clients)
    server.open_clients()
    for c in server.clients:
        if not c.excluded:
            server.links.post(c, _sync_message(server, c, state["client_optimizers"].get(c.name)))


def _sync_message(server, c, optimizer) -> Sync:
    has = server.replica.has_adapter(c.name) and bool(server.device_ranks(c))
    return Sync(c.split_point, server.device_ranks(c), server.generation,
                weights=server.replica.weights(sorted(n for n in server.touched if c.hosts(layer_of(n)))),
                factors=server.replica.factors(c.name, c.device_layers) if has else {}, optimizer=optimizer)


def _optimizer_state(server, c) -> dict | None:
    reply = server.links.ask(c, OptimizerState())
    return None if reply is None else reply.state
