"""What the main server tells a client at a round boundary, as typed messages.

Each transport carries them its own way: the in-process client that shares the server's replica has
nothing to apply, a client process applies them to its own replica (distributed/worker.py).
Factors are keyed `matrix|A` / `matrix|B`; merges and folds are (matrix, B_cat, A_cat) with delta B_cat A_cat.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Configure:
    """A new plan: the client's split point and device-side ranks. Only what changed restarts: the client's own
    adapter is rebuilt when its ranks changed (`rebuild`), else the changed matrices restart (`restarts`); the
    learned deltas of changed matrices its device held are folded into the frozen weights first (`folds`); a
    deeper split brings the frozen weights of the newly hosted blocks (`blocks`)."""
    split_point: int
    ranks: dict[str, int]
    generation: int
    rebuild: bool
    restarts: list[str] = field(default_factory=list)
    folds: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    blocks: list[dict[str, torch.Tensor]] = field(default_factory=list)


@dataclass
class CatchUp:
    """For a client back from an absence: the merged weights of its device side and, for non-merging methods,
    its device-side factors; for merging methods its adapter restarts at `generation`."""
    restart: bool
    generation: int
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Apply:
    """The result of an aggregation for one client: merges on its device side (then a restart at
    `generation`), or its new factors."""
    restart: bool
    generation: int
    merges: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    factors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Sync:
    """Everything a client held at a checkpoint, for a resumed run (its optimizer state included)."""
    split_point: int
    ranks: dict[str, int]
    generation: int
    epoch: int
    pos: int
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict | None = None
