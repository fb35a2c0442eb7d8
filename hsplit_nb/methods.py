"""Methods as small declarations on one engine: how to split, how to choose ranks, how to aggregate.

split:      "armsc" (planner), "weakest" (the weakest budget's split for everyone), "none" (no split:
            each client trains the whole model), "central" (one model on pooled data).
ranks:      "armsc" (greedy by importance per byte), "weakest" (one uniform rank, the largest the
            weakest client fits), "budget-order" (uniform per client, rank levels in budget order),
            "max" (the largest level everywhere), "full" (full fine-tuning, no adapters).
importance: "iwi" (RNGWP calibrations) or "uniform".
aggregator: a name from hsplit_nb.aggregation, "zeropad" (average zero-padded A and B, weights n_k),
            or "none".
server:     "per-client" (the server keeps each client's server-side adapters) or "shared" (one
            server-side adapter set trained by every client in turn, as in SplitLoRA).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    split: str
    ranks: str
    importance: str = "uniform"
    aggregator: str = "naa"
    server: str = "per-client"
    hetlora_lambda: float = 0.0  # weight of HetLoRA's self-pruning regulariser
    strict_memory: bool = False  # no-split methods: charge the whole model, leave out clients it does not fit
    description: str = ""

    @property
    def splits(self) -> bool:
        return self.split in ("armsc", "weakest")

    @property
    def federated(self) -> bool:
        return self.split != "central"


METHODS = {m.name: m for m in [
    Method("hsplitlora", "armsc", "armsc", "iwi", "naa", description="HSplitLoRA: IWI + ARMSC + NAA"),
    Method("splitlora", "weakest", "weakest", "uniform", "fedavg", server="shared",
           description="SplitLoRA: weakest client's split and rank, shared server adapters, FedAvg"),
    Method("hetlora", "none", "budget-order", "uniform", "hetlora", hetlora_lambda=1e-3,
           description="HetLoRA: no split, ranks by budget, zero-pad + norm-weighted aggregation"),
    Method("hetlora-strict", "none", "budget-order", "uniform", "hetlora", hetlora_lambda=1e-3, strict_memory=True,
           description="HetLoRA charged the whole model: clients that cannot hold it stay out"),
    Method("cenlora", "central", "max", description="Centralised LoRA on pooled data (reference)"),
    Method("ft", "central", "full", aggregator="none", description="Full fine-tuning on pooled data (reference)"),
    Method("hsplitlora-no-iwi", "armsc", "armsc", "uniform", "naa", description="ablation: uniform importance"),
    # without ARMSC nothing consumes importance, so no calibrations are spent
    Method("hsplitlora-no-armsc", "weakest", "weakest", "uniform", "naa",
           description="ablation: weakest client's split and rank for everyone"),
    Method("hsplitlora-no-naa", "armsc", "armsc", "iwi", "zeropad",
           description="ablation: zero-pad and average A and B instead of NAA"),
    Method("flora", "none", "budget-order", "uniform", "flora", description="FLoRA: stacking, no split"),
    Method("flexlora", "none", "budget-order", "uniform", "flexlora",
           description="FlexLoRA: averaged deltas, SVD, per-client truncation, no split"),
]}

PAPER_METHODS = ["hsplitlora", "splitlora", "hetlora", "cenlora", "ft"]
ABLATIONS = ["hsplitlora-no-iwi", "hsplitlora-no-armsc", "hsplitlora-no-naa"]
EXTRAS = ["hetlora-strict", "flora", "flexlora"]


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]
