"""NAA (noise-free adapter aggregation) and the baselines' aggregators, per matrix.

Every aggregator takes, for one matrix, the clients' adapters (LoraFactors, or None for a client that
is absent or has rank 0 there) and their weights (data sizes n_k), and returns an `Aggregate`:
a delta to fold into every copy of the frozen weight (as factors: a dense delta never travels) and/or
new factors for each client's adapter. NAA and FLoRA merge and restart; FedAvg, HetLoRA and FlexLoRA
send factors back.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import torch

from .adapters import ADAPTER, LoraFactors, adapter_names, base_weight, lora_layer, merge_delta, read_adapter, reset_adapter, write_adapter


@dataclass
class Stacked:
    """Concatenated factors: B_cat (d_out x sum r_k) and A_cat (sum r_k x d_in); delta = B_cat @ A_cat."""
    B: torch.Tensor
    A: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        return self.B @ self.A


@dataclass
class Aggregate:
    merge: Stacked | None = None  # folded into every copy of the frozen weight, then adapters restart
    factors: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)  # (A, B) per client
    global_delta: Stacked | None = None  # the global model's delta when nothing is merged (for evaluation)


class HolderError(ValueError):
    """One holder's adapter or weight cannot be aggregated; `index` says which (the federation names it)."""

    def __init__(self, index: int | None, problem: str):
        super().__init__(problem if index is None else f"holder {index}: {problem}")
        self.index, self.problem = index, problem


def _check_holder(k: int, f, shape: tuple | None) -> tuple:
    if not all(hasattr(f, a) for a in ("A", "B", "scale")):
        raise HolderError(k, f"expected LoraFactors (A, B, scale) or None, got {type(f).__name__}")
    if f.A.dim() != 2 or f.B.dim() != 2 or f.A.shape[0] != f.B.shape[1]:
        raise HolderError(k, f"A {tuple(f.A.shape)} and B {tuple(f.B.shape)} are not r x d_in and d_out x r")
    here = (f.B.shape[0], f.A.shape[1])
    if shape is not None and here != shape:
        raise HolderError(k, f"d_out x d_in is {here[0]} x {here[1]}, the other holders' {shape[0]} x {shape[1]}")
    if not (math.isfinite(f.scale) and torch.isfinite(f.A).all() and torch.isfinite(f.B).all()):
        raise HolderError(k, "its factors or scale are not finite (a diverged client?)")
    return here


def _present(adapters, weights):
    """The holders that count (present, rank > 0, weight > 0) and their normalised weights, after checking
    every input: one weight per adapter, finite and non-negative; factors of matching shapes, finite."""
    if len(adapters) != len(weights):
        raise HolderError(None, f"got {len(adapters)} adapters but {len(weights)} weights")
    shape = None
    for k, (f, w) in enumerate(zip(adapters, weights)):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not (math.isfinite(w) and w >= 0):
            raise HolderError(k, f"weight {w!r} is not allowed; weights are finite non-negative numbers (data sizes)")
        if f is not None:
            shape = _check_holder(k, f, shape)
    idx = [k for k, (f, w) in enumerate(zip(adapters, weights)) if f is not None and f.rank > 0 and w > 0]
    total = sum(weights[k] for k in idx)
    return idx, {k: weights[k] / total for k in idx}


def naa(adapters: list[LoraFactors | None], weights: list[float]) -> Stacked | None:
    """B_cat = [p_1 c_1 B_1 | ... | p_K c_K B_K], A_cat = [A_1; ...; A_K], so B_cat A_cat = sum_k p_k c_k B_k A_k
    exactly. Absent and rank-0 clients are skipped and p renormalised over the rest; None if nobody trained."""
    idx, p = _present(adapters, weights)
    if not idx:
        return None
    B = torch.cat([p[k] * adapters[k].scale * adapters[k].B for k in idx], dim=1)
    A = torch.cat([adapters[k].A for k in idx], dim=0)
    return Stacked(B, A)


def naa_aggregate(adapters, weights) -> Aggregate:
    return Aggregate(merge=naa(adapters, weights), factors=[None] * len(adapters))


flora_aggregate = naa_aggregate  # FLoRA stacks exactly like NAA; the method differs in having no split


def fedavg(adapters, weights) -> Aggregate:
    """FedAvg of A and B separately (SplitLoRA's client-side aggregation): every client gets the averages.

    The product of averages is not the average of products: the cross terms B_j A_k remain."""
    idx, p = _present(adapters, weights)
    if not idx:
        return Aggregate(factors=[None] * len(adapters))
    ranks = {adapters[k].rank for k in idx}
    if len(ranks) != 1:
        raise ValueError(f"fedavg needs equal ranks, got {sorted(ranks)}; use naa or hetlora for mixed ranks")
    scales = {adapters[k].scale for k in idx}
    if len(scales) != 1:
        raise ValueError(f"fedavg needs equal scales, got {sorted(scales)}")
    A = sum(p[k] * adapters[k].A for k in idx)
    B = sum(p[k] * adapters[k].B for k in idx)
    return Aggregate(factors=[(A.clone(), B.clone()) if f is not None and f.rank > 0 else None for f in adapters],
                     global_delta=Stacked(scales.pop() * B, A))


def zero_pad_average(adapters, weights) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Zero-pad every client's (A, c B) to the largest rank of any client and average them separately
    (weights p; a client of weight 0 still sets the padded rank but adds nothing)."""
    idx, p = _present(adapters, weights)
    if not idx:
        return None
    r_max = max(f.rank for f in adapters if f is not None)
    f0 = adapters[idx[0]]
    A = f0.A.new_zeros(r_max, f0.A.shape[1])
    B = f0.B.new_zeros(f0.B.shape[0], r_max)
    for k in idx:
        f = adapters[k]
        A[: f.rank] += p[k] * f.A
        B[:, : f.rank] += p[k] * f.scale * f.B
    return A, B


def zeropad(adapters, weights) -> Aggregate:
    """The no-NAA ablation: zero-pad A and c B to the largest rank, average them separately with data
    weights p_k, and send each client the truncation to its own rank."""
    padded = zero_pad_average(adapters, weights)
    if padded is None:
        return Aggregate(factors=[None] * len(adapters))
    A, B = padded
    return Aggregate(factors=[(A[: f.rank].clone(), B[:, : f.rank].clone() / f.scale) if f is not None and f.rank > 0
                              else None for f in adapters], global_delta=Stacked(B, A))


def hetlora(adapters, weights=None) -> Aggregate:
    """HetLoRA: zero-pad to the largest rank, weight each client by the Frobenius norm of its update
    c_k B_k A_k (sparsity-weighted aggregation), then truncate to each client's own rank."""
    norms = [float(f.delta().norm()) if f is not None and f.rank > 0 else 0.0 for f in adapters]
    if weights is not None:  # absent clients (weight 0) stay out
        norms = [n if w > 0 else 0.0 for n, w in zip(norms, weights)]
    if sum(norms) == 0:
        return Aggregate(factors=[None] * len(adapters))
    return zeropad(adapters, norms)


def hetlora_regulariser(model, gamma: float = 0.9, adapter: str = ADAPTER) -> torch.Tensor:
    """HetLoRA's rank self-pruning term: sum over adapters of ||B[:, tail]||_F * ||A[tail, :]||_F, where the
    tail is the rank components from ceil(gamma * r) on. Add lambda times this to the loss."""
    if not 0 < gamma < 1:
        raise ValueError(f"gamma must be in (0, 1), got {gamma!r}")
    terms = []
    for name in adapter_names(model, adapter):
        layer = lora_layer(model, name, adapter)
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        start = min(A.shape[0] - 1, int(torch.tensor(gamma * A.shape[0]).ceil()))
        terms.append(B[:, start:].norm() * A[start:].norm())
    return torch.stack(terms).sum() if terms else torch.zeros(())


def flexlora(adapters, weights) -> Aggregate:
    """FlexLoRA: average the full deltas, SVD, truncate to each client's rank (B = U sqrt(S) / c, A = sqrt(S) V^T)."""
    idx, p = _present(adapters, weights)
    if not idx:
        return Aggregate(factors=[None] * len(adapters))
    delta = sum(p[k] * adapters[k].delta() for k in idx)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    out = []
    for f in adapters:
        if f is None or f.rank == 0:
            out.append(None)
            continue
        root = S[: f.rank].sqrt()
        out.append(((root[:, None] * Vh[: f.rank]).clone(), (U[:, : f.rank] * root[None, :] / f.scale).clone()))
    return Aggregate(factors=out, global_delta=naa(adapters, weights))


@dataclass(frozen=True)
class Aggregator:
    """An aggregation rule as a behaviour object: how to combine one matrix's adapters, whether the result is
    merged into the frozen weights (then every adapter restarts) and what it sends each client."""
    name: str
    combine: Callable[..., Aggregate]
    merges: bool  # True: fold the aggregate into every copy of the frozen weight, then restart (NAA, FLoRA)

    def __call__(self, adapters, weights, holders=None, matrix: str | None = None) -> Aggregate:
        """Combine one matrix's adapters; an input error names the matrix and the holder (by `holders`)."""
        try:
            return self.combine(adapters, weights)
        except HolderError as exc:
            who = holders[exc.index] if holders is not None and exc.index is not None else \
                (f"holder {exc.index}" if exc.index is not None else "the inputs")
            err = HolderError(None, f"{self.name} on {matrix or 'a matrix'}, {who}: {exc.problem}")
            err.index = exc.index
            raise err from None

    def communication(self, ranks: list[int], d_in: int, d_out: int, on_device: list[bool],
                      bytes_per_value: int = 4) -> list[dict[str, int]]:
        """Bytes each client uploads and downloads for one matrix in one aggregation.

        Only device-side adapters travel (the server holds the others). Uploads: the client's own factors.
        Downloads: a merging rule sends B_cat and A_cat (the sum of the present ranks) to every client hosting
        the layer, which merges locally; the others send each device-side adapter its new factors."""
        if len(ranks) != len(on_device):
            raise ValueError(f"got {len(ranks)} ranks but {len(on_device)} on_device flags")
        per_rank = (d_in + d_out) * bytes_per_value
        total_rank = sum(ranks)
        return [{"up": r * per_rank if dev else 0,
                 "down": ((total_rank if self.merges else r) * per_rank) if dev else 0}
                for r, dev in zip(ranks, on_device)]

    def hosting_download(self, total_rank: int, d_in: int, d_out: int, bytes_per_value: int = 4) -> int:
        """What a client hosting a layer without an adapter on the matrix downloads: a merge it must apply too."""
        return total_rank * (d_in + d_out) * bytes_per_value if self.merges else 0

    def share(self, has_device_adapter: bool) -> tuple[bool, bool]:
        """What a client gets after an aggregation, or on its return from an absence: (its device adapter
        restarts, its new device factors are sent)."""
        return has_device_adapter and self.merges, has_device_adapter and not self.merges

    def return_bytes(self, merged_weight_bytes: int, device_factor_bytes: int) -> int:
        """What a returning client downloads: the merged weights of its device side, and its device factors
        where the rule sends factors rather than restarting."""
        return merged_weight_bytes + (0 if self.merges else device_factor_bytes)

    def traffic(self, matrices, device_ranks: list[dict[str, int]], splits: list[int], server_rank: int) -> list[int]:
        """ARMSC's model of one aggregation: per client, the bytes up and down (`communication` per matrix, and
        `hosting_download`), for clients at `splits` with `device_ranks`, and the server's shared copy at
        `server_rank` as one more holder of every layer some client's server part contains."""
        out = [0] * len(splits)
        for m in matrices:
            holders = [k for k, s in enumerate(splits) if m.layer < s and device_ranks[k].get(m.name, 0) > 0]
            if not holders:
                continue
            ranks = [device_ranks[k][m.name] for k in holders]
            copy = server_rank if any(m.layer >= s for s in splits) else 0
            comm = self.communication(ranks + [copy], m.d_in, m.d_out, [True] * len(ranks) + [False])
            for k, cb in zip(holders, comm):
                out[k] += cb["up"] + cb["down"]
            for k, s in enumerate(splits):
                if m.layer < s and k not in holders:
                    out[k] += self.hosting_download(sum(ranks) + copy, m.d_in, m.d_out)
        return out


AGGREGATORS = {a.name: a for a in [
    Aggregator("naa", naa_aggregate, merges=True),
    Aggregator("flora", flora_aggregate, merges=True),
    Aggregator("fedavg", fedavg, merges=False),
    Aggregator("hetlora", hetlora, merges=False),
    Aggregator("flexlora", flexlora, merges=False),
    Aggregator("zeropad", zeropad, merges=False),
]}


def get_aggregator(name: str) -> Aggregator:
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; choose one of {sorted(AGGREGATORS)}")
    return AGGREGATORS[name]


# ---- applying an aggregate ------------------------------------------------------------------

def _forget(optimizers, model, name, adapter=ADAPTER):
    layer = lora_layer(model, name, adapter)
    for opt in optimizers:
        for param in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
            opt.state.pop(param, None)


def merge(copies, name: str, stacked: Stacked, adapters=(), optimizers=()) -> None:
    """Fold B_cat A_cat into every copy of the frozen weight of `name`, then restart the adapters on it
    (`adapters`: models, or (model, adapter name) pairs, whose adapter on `name` restarts at its rank;
    A random, B zero, Adam state dropped)."""
    delta = stacked.delta()
    seen = set()
    for model in copies:
        w = base_weight(model, name).untyped_storage().data_ptr()
        if w in seen:  # two views of one tensor: merge once
            continue
        seen.add(w)
        merge_delta(model, name, delta)
    for entry in adapters:
        model, adapter = entry if isinstance(entry, tuple) else (entry, ADAPTER)
        reset_adapter(model, name, adapter)
        _forget(optimizers, model, name, adapter)


def load_factors(model, name: str, A: torch.Tensor, B: torch.Tensor, optimizers=(), adapter: str = ADAPTER) -> None:
    """Write aggregated factors back into a client's adapter and drop its Adam state."""
    write_adapter(model, name, A, B, adapter)
    _forget(optimizers, model, name, adapter)


def read_all(models, name: str) -> list[LoraFactors | None]:
    """Each model's adapter on `name`, or None where it has none."""
    return [read_adapter(m, name) if name in adapter_names(m) else None for m in models]


# ---- communication --------------------------------------------------------------------------

def communication(aggregator: str, ranks: list[int], d_in: int, d_out: int, on_device: list[bool],
                  bytes_per_value: int = 4) -> list[dict[str, int]]:
    """Bytes each client uploads and downloads for one matrix in one aggregation, by aggregator name
    (see `Aggregator.communication`)."""
    return get_aggregator(aggregator).communication(ranks, d_in, d_out, on_device, bytes_per_value)
