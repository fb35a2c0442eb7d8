"""The pieces of a checkpoint that are not a part's own state: the clients' records (split, ranks, presence,
budget, data cursor), the random generators, and a replica's adapters (the central trainer's)."""
from __future__ import annotations

import random

import numpy as np
import torch

from ..adapters import adapter_names, read_adapter
from ..costs import ClientSpec


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
