"""LoRA adapters through peft: candidate matrices, per-matrix ranks, and (A, B, scale) read/write/merge.

Conventions: a matrix is named by its module path inside the transformers model (for example
``model.layers.3.self_attn.q_proj`` or ``transformer.h.3.attn.c_attn``); its delta is always
``scale * B @ A`` with shape (d_out, d_in), also for GPT-2's Conv1D whose weight is stored (d_in, d_out).
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from .architectures import ARCHITECTURES, architecture, num_blocks
from .split import unwrap

ADAPTER = "default"
DEFAULT_TOP_RANK = 16
# scale = alpha / r with alpha fixed across ranks (Hu et al.): under Adam every parameter moves about lr per step,
# so a fixed alpha keeps the first steps' size about the same at every rank; 2 x the top rank level keeps scale 2 there
DEFAULT_ALPHA = 2.0 * DEFAULT_TOP_RANK


@dataclass(frozen=True)
class Matrix:
    """One candidate weight matrix W (d_out x d_in) of one block."""
    name: str
    layer: int
    kind: str
    d_in: int
    d_out: int

    @property
    def rank1_cost(self) -> int:
        """Parameters of a rank-1 adapter on this matrix: c_m = d_in + d_out."""
        return self.d_in + self.d_out


def layer_of(name: str) -> int:
    """The block index of a matrix from its name: the part after its family's block list (the table's `blocks`)."""
    for arch in ARCHITECTURES.values():
        if name.startswith(arch.blocks + "."):
            return int(name[len(arch.blocks) + 1:].split(".", 1)[0])
    raise ValueError(f"{name!r} is no block's matrix in any family of the architecture table "
                     f"(block lists: {', '.join(a.blocks for a in ARCHITECTURES.values())})")


def candidate_matrices(model_or_config) -> list[Matrix]:
    """Every candidate matrix of every block, in layer order."""
    config = getattr(model_or_config, "config", model_or_config)
    arch = architecture(config)
    shapes = arch.shapes(config)
    return [Matrix(f"{arch.blocks}.{layer}.{path}", layer, kind, *shapes[kind])
            for layer in range(num_blocks(config)) for kind, path in arch.candidates.items()]


def resolve_ranks(model_or_config, ranks) -> dict[str, int]:
    """Rank of every candidate matrix from an int (all), {kind: r} (every layer) or {matrix name: r}.

    Names override kinds; matrices not mentioned get rank 0 (no adapter).
    """
    matrices = candidate_matrices(model_or_config)
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        ranks = {m.kind: ranks for m in matrices}
    if not isinstance(ranks, dict):
        raise TypeError(f"ranks must be an int or a dict of kind/matrix name -> rank, got {type(ranks).__name__}")
    kinds, names = {m.kind for m in matrices}, {m.name for m in matrices}
    for key, r in ranks.items():
        if key not in kinds and key not in names:
            raise ValueError(f"unknown matrix {key!r}: use a kind ({', '.join(sorted(kinds))}) "
                             f"or a full name such as {matrices[0].name!r}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"rank for {key!r} must be a non-negative integer, got {r!r}")
    return {m.name: ranks.get(m.name, ranks.get(m.kind, 0)) for m in matrices}


def lora_config(model_or_config, ranks, alpha: float = DEFAULT_ALPHA, dropout: float = 0.0) -> LoraConfig:
    """peft LoraConfig with per-matrix ranks (rank_pattern) and one alpha for every rank, so scale = alpha / r."""
    resolved = {name: r for name, r in resolve_ranks(model_or_config, ranks).items() if r > 0}
    if not resolved:
        raise ValueError("every rank is 0: at least one matrix needs an adapter (rank > 0)")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    first = next(iter(resolved.values()))
    config = getattr(model_or_config, "config", model_or_config)
    return LoraConfig(
        r=first, lora_alpha=alpha, lora_dropout=dropout, bias="none",
        target_modules=sorted(resolved),
        rank_pattern={re.escape(name): r for name, r in resolved.items()},
        alpha_pattern={re.escape(name): alpha for name in resolved},
        fan_in_fan_out=architecture(config).weights_transposed,
    )


def add_adapters(model, ranks, alpha: float = DEFAULT_ALPHA, dropout: float = 0.0,
                 adapter: str = ADAPTER):
    """LoRA on the matrices of nonzero rank, as adapter `adapter`: wraps a transformers model in a peft
    model (base weights frozen), or adds one more named adapter to a peft model."""
    config = lora_config(unwrap(model), ranks, alpha, dropout)
    if unwrap(model) is model:
        return get_peft_model(model, config, adapter_name=adapter)
    model.add_adapter(adapter, config)
    return model


@dataclass
class LoraFactors:
    """One adapter: delta = scale * B @ A, A (r x d_in), B (d_out x r)."""
    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)


def lora_layer(model, name: str, adapter: str = ADAPTER) -> LoraLayer:
    module = unwrap(model).get_submodule(name)
    if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
        raise KeyError(f"{name!r} carries no LoRA adapter {adapter!r}")
    return module


def adapter_names(model, adapter: str = ADAPTER) -> list[str]:
    """Names of the matrices that carry adapter `adapter`."""
    return [name for name, m in unwrap(model).named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


def adapter_parameters(model, adapter: str = ADAPTER, layers=None) -> list[torch.nn.Parameter]:
    """The A and B weights of adapter `adapter` (optionally only on blocks in `layers`), in a fixed order."""
    out = []
    for name in adapter_names(model, adapter):
        if layers is None or layer_of(name) in layers:
            layer = lora_layer(model, name, adapter)
            out += [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
    return out


def read_adapter(model, name: str, adapter: str = ADAPTER) -> LoraFactors:
    """A copy of the adapter's factors and scale."""
    layer = lora_layer(model, name, adapter)
    return LoraFactors(layer.lora_A[adapter].weight.detach().clone(), layer.lora_B[adapter].weight.detach().clone(),
                       float(layer.scaling[adapter]))


def write_adapter(model, name: str, A: torch.Tensor, B: torch.Tensor, adapter: str = ADAPTER) -> None:
    """Overwrite the adapter's factors in place (same rank; the optimizer keeps pointing at them)."""
    layer = lora_layer(model, name, adapter)
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if tuple(A.shape) != tuple(a.shape) or tuple(B.shape) != tuple(b.shape):
        raise ValueError(f"{name}: expected A {tuple(a.shape)} and B {tuple(b.shape)}, "
                         f"got A {tuple(A.shape)} and B {tuple(B.shape)}")
    with torch.no_grad():
        a.copy_(A)
        b.copy_(B)


def reset_adapter(model, name: str, adapter: str = ADAPTER) -> None:
    """Fresh adapter at the same rank: A random (peft's Kaiming init), B zero, so its delta is zero."""
    lora_layer(model, name, adapter).reset_lora_parameters(adapter, True)


def restart_seed(seed: int, name: str, generation: int) -> int:
    """A 63-bit seed for (re)starting every adapter on matrix `name` at `generation`, the same in every process
    and for every holder: a client's name never enters it (common initialisation)."""
    digest = hashlib.sha256(f"{seed}/{name}/{generation}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def restart_adapter(model, name: str, adapter: str, seed: int, top_rank: int | None = None) -> None:
    """Fresh adapter at the same rank from its own generator: A by peft's Kaiming-uniform init drawn at
    `top_rank` rows (default: its own rank), of which a rank-r adapter takes the first r; B zero.

    With a seed both sides know, a client and the server restart the same adapter to the same values
    without sending it, and adapters of different ranks on one matrix share their leading rows of A."""
    layer = lora_layer(model, name, adapter)
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    rows = max(A.shape[0], top_rank or 0)
    fresh = torch.empty((rows, A.shape[1]), dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        A.copy_(fresh[: A.shape[0]])
        B.zero_()


def base_weight(model, name: str) -> torch.nn.Parameter:
    """The frozen weight of a matrix, whether or not it carries an adapter."""
    module = unwrap(model).get_submodule(name)
    return module.get_base_layer().weight if isinstance(module, LoraLayer) else module.weight


def merge_delta(model, name: str, delta: torch.Tensor) -> None:
    """Add a (d_out x d_in) delta to a matrix's frozen weight (transposed for GPT-2's Conv1D)."""
    weight = base_weight(model, name)
    stored_transposed = architecture(unwrap(model)).weights_transposed
    d = delta.T if stored_transposed else delta
    if tuple(d.shape) != tuple(weight.shape):
        raise ValueError(f"{name}: delta of shape {tuple(delta.shape)} does not fit a weight stored as "
                         f"{tuple(weight.shape)}")
    with torch.no_grad():
        weight.add_(d.to(weight.dtype))
