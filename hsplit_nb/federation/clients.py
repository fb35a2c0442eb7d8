"""A client as the main server knows it: its resources, its data partition and where it reads next, its
split point and ranks, and whether it takes part; and the deterministic order of its mini-batches."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..costs import ClientSpec


@dataclass
class Client:
    name: str
    spec: ClientSpec
    indices: list[int]
    split_point: int = 0  # blocks [0, split_point) live on the device; L when the model is not split
    ranks: dict[str, int] = field(default_factory=dict)
    present: bool = True
    excluded: bool = False  # left out for good (HetLoRA with strict memory, or a client process that was lost)
    epoch: int = 0
    pos: int = 0

    def hosts(self, layer: int) -> bool:
        """Whether block `layer` lives on the client's device."""
        return layer < self.split_point

    @property
    def device_layers(self) -> range:
        return range(self.split_point)


def next_indices(c: Client, batch_size: int, seed: int, stream: int) -> list[int]:
    """Positions (into c.indices) of a client's next mini-batch, advancing c.epoch and c.pos: its partition
    reshuffled every epoch, deterministically by (seed, stream, epoch)."""
    out: list[int] = []
    while len(out) < batch_size:
        order = np.random.default_rng([seed, stream, c.epoch]).permutation(len(c.indices))
        take = order[c.pos:c.pos + batch_size - len(out)]
        out += [int(i) for i in take]
        c.pos += len(take)
        if c.pos >= len(c.indices):
            c.epoch, c.pos = c.epoch + 1, 0
    return out


def apply_events(clients: list[Client], r: int, events) -> list[Client]:
    """Dropouts and budget changes of round r; returns the clients that came back."""
    returned = []
    for c in clients:
        away = c.excluded or any(e["type"] == "dropout" and e["client"] == c.name and e["start"] <= r <= e["end"]
                                 for e in events)
        if c.present and away:
            c.present = False
        elif not c.present and not away:
            c.present = True
            returned.append(c)
        for e in events:
            if e["type"] == "budget" and e["client"] == c.name and e["round"] == r:
                c.spec = ClientSpec(c.name, e["memory"], c.spec.speed, c.spec.bandwidth)
    return returned
