"""A main server's state at a round boundary, for atomic per-round checkpoints and an identical resume."""
from __future__ import annotations

import random

import numpy as np
import torch

from ..adapters import adapter_names, layer_of, read_adapter, write_adapter
from ..aggregation import Stacked
from ..costs import ClientSpec
from .messages import Sync

TRACKER_FIELDS = ("t", "ibar", "history", "_g_config", "_budgets_config", "_present_config")


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
        "calibrations": server.calibrations, "local_step": server.local_step, "pending": list(server.pending),
        "generation": server.generation, "last_reset": dict(server.last_reset),
        "configured_state": server.configured_state, "sim_time": server.sim_time, "wall_time": server.wall_time,
        "tracker": None if server.tracker is None else {k: getattr(server.tracker, k) for k in TRACKER_FIELDS},
        "server_optimizers": {k: None if opt is None else opt.state_dict() for k, opt in server.server_opts.items()},
        "client_optimizers": {c.name: server.ask(c, "optimizer_state") for c in server.clients if not c.excluded},
        "rng": rng_state(), "reconfigurations": list(server.reconfigurations),
    }


def load_server_state(server, state: dict) -> None:
    """Restore a state written by `server_state` into a server built from the same configuration; client
    processes get what they held (`Sync`)."""
    server.missed = set(state["missed"])
    load_client_records(server.clients, state["clients"])
    for adapter, mats in state["adapters"].items():
        server._replace_adapter(adapter, {n: f.rank for n, f in mats.items()})
        for n, f in mats.items():
            write_adapter(server.pm, n, f.A, f.B, adapter)
    server.replica.load_weights(state["touched"])
    server.touched = set(state["touched"])
    server.global_deltas = {n: Stacked(B, A) for n, (B, A) in state["global_deltas"].items()}
    server.calibrations, server.local_step = state["calibrations"], state["local_step"]
    server.generation, server.last_reset = state["generation"], dict(state["last_reset"])
    server.pending, server.configured_state = state["pending"], state["configured_state"]
    server.sim_time, server.wall_time = state["sim_time"], state["wall_time"]
    server.reconfigurations = list(state["reconfigurations"])
    if server.tracker is not None and state["tracker"] is not None:
        for k, v in state["tracker"].items():
            setattr(server.tracker, k, v)
    server.server_opts.clear()
    for key, saved in state["server_optimizers"].items():
        opt = server.server_opts[key] = server.server_opts.new(key)
        if saved is not None:
            opt.load_state_dict(saved)
    load_rng_state(state["rng"])
    server._mark_lost_clients()
    server._open()
    for c in server.clients:
        if not c.excluded:
            server.ask(c, "sync", _sync_message(server, c, state["client_optimizers"].get(c.name)))


def _sync_message(server, c, optimizer) -> Sync:
    has = server.replica.has_adapter(c.name) and bool(server.device_ranks(c))
    return Sync(c.split_point, server.device_ranks(c), server.generation, c.epoch, c.pos,
                weights=server.replica.weights(sorted(n for n in server.touched if c.hosts(layer_of(n)))),
                factors=server.replica.factors(c.name, c.device_layers) if has else {}, optimizer=optimizer)
