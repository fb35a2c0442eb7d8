"""Cost models from a model config alone: sizes, client memory, FLOPs and weight bytes (times: latency.py).

Memory of client k at split s with ranks r (bytes): frozen weights of the embeddings and s blocks,
the activations its blocks save for backward at the configured batch and sequence length, the
adapters (4 bytes x 4 copies: weight, grad, two Adam moments) and the smashed-data buffer.
The activation model follows what autograd really saves when base weights are frozen: a block
saves nothing until something upstream of it (or inside it) is trainable, so where the first
adapter sits matters (each family's block model is in the architecture table).
`measure_client_memory` checks the model against a real forward. ARMSC (planner.py) uses these.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .adapters import Matrix, candidate_matrices, resolve_ranks
from .architectures import ARCHITECTURES, architecture, hidden_size, num_blocks
from .split import split_model

ADAPTER_COPIES_BYTES = 4 * 4  # fp32 weight, grad, Adam exp_avg, exp_avg_sq
DEFAULT_BANDWIDTH = 1e8  # bytes/s (800 Mbit/s)
FLOPS_PER_BUDGET_BYTE = 1e3  # default client speed: a 20 GB budget computes at 20 TFLOP/s
# A local step that also calibrates IWI (hooks form x^T g_out for every frozen candidate weight) against a plain
# step: measured by bench/iwi_cost.py (SmolLM2-135M, CPU; bench/results/iwi_cost.json). Clock and ARMSC charge it.
CALIBRATION_STEP_FACTOR = 1.37


def dtype_bytes(dtype) -> int:
    if isinstance(dtype, int):
        return dtype
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Dims:
    """What the cost models need to know about an architecture (sizes from the architecture table)."""
    family: str
    n_layers: int
    d: int
    d_q: int
    d_kv: int
    inner: int
    heads: int
    head_dim: int
    vocab: int
    emb_params: int
    block_params: int
    block_matmul_params: int
    final_norm_params: int

    @classmethod
    def of(cls, config) -> "Dims":
        arch = architecture(config)
        return cls(arch.family, n_layers=num_blocks(config), vocab=config.vocab_size, **arch.sizes(config))


# ---- memory ---------------------------------------------------------------------------------

def _block_activation_bytes(dims: Dims, live: bool, r: dict[str, int], bt: int, batch: int, seq: int,
                            p: int) -> tuple[int, bool, bool]:
    """Bytes one block saves for backward, whether its output requires grad, whether it saves the rotary
    tables: the family's own model from the architecture table."""
    return ARCHITECTURES[dims.family].block_activations(dims, live, r, bt, batch, seq, p)


def _ranks_by_layer(config, ranks, split_point: int) -> list[dict[str, int]]:
    by_layer: list[dict[str, int]] = [{} for _ in range(split_point)]
    for m in candidate_matrices(config):
        if m.layer < split_point:
            by_layer[m.layer][m.kind] = ranks.get(m.name, 0)
    return by_layer


def activation_bytes(config, split_point: int, ranks, batch_size: int, seq_len: int, dtype=torch.float32) -> int:
    """Bytes the client's blocks [0, s) save for backward (plus the shared mask and rotary tables)."""
    dims, p = Dims.of(config), dtype_bytes(dtype)
    ranks = resolve_ranks(config, ranks)
    return _activations(dims, _ranks_by_layer(config, ranks, split_point), batch_size, seq_len, p)


def _activations(dims: Dims, by_layer: list[dict[str, int]], batch: int, seq: int, p: int) -> int:
    bt, live, total, rope = batch * seq, False, 0, False
    for r in by_layer:
        saved, out_live, block_rope = _block_activation_bytes(dims, live, r, bt, batch, seq, p)
        total += saved
        live, rope = out_live, rope or block_rope
    if rope:
        total += 2 * seq * dims.head_dim * 4  # cos and sin tables, shared by all blocks
    return total


def adapter_bytes(config, ranks, layers=None) -> int:
    """Adapter weight + grad + Adam moments (fp32) for the matrices in `layers` (default: all)."""
    return matrices_adapter_bytes(candidate_matrices(config), resolve_ranks(config, ranks), layers)


def matrices_adapter_bytes(matrices, ranks: dict[str, int], layers=None) -> int:
    """`adapter_bytes` over candidate matrices already built, with ranks by matrix name."""
    return sum(ADAPTER_COPIES_BYTES * ranks.get(m.name, 0) * m.rank1_cost for m in matrices
               if layers is None or m.layer in layers)


def client_memory(config, split_point: int, ranks, batch_size: int, seq_len: int, dtype=torch.float32,
                  breakdown: bool = False):
    """Predicted bytes on client k at split s with `ranks` (an int, {kind: r} or {matrix name: r})."""
    config = getattr(config, "config", config)
    dims, p = Dims.of(config), dtype_bytes(dtype)
    if not 1 <= split_point <= dims.n_layers - 1:
        raise ValueError(f"split_point must be an integer in [1, {dims.n_layers - 1}], got {split_point!r}")
    ranks = resolve_ranks(config, ranks)
    parts = {
        "weights": p * (dims.emb_params + split_point * dims.block_params),
        "activations": _activations(dims, _ranks_by_layer(config, ranks, split_point), batch_size, seq_len, p),
        "adapters": adapter_bytes(config, ranks, range(split_point)),
        "smashed": batch_size * seq_len * dims.d * p,
    }
    return parts if breakdown else sum(parts.values())


def smallest_budget(config, batch_size: int, seq_len: int, rank: int, headroom: float = 0.1,
                    dtype=torch.float32) -> float:
    """The least memory budget any split method can run in: split point 1 with one adapter at `rank` on the
    cheapest block-0 matrix, plus the planner's headroom. Below it no split point fits."""
    cheapest = min((m for m in candidate_matrices(config) if m.layer == 0), key=lambda m: m.rank1_cost)
    return client_memory(config, 1, {cheapest.name: rank}, batch_size, seq_len, dtype) / (1 - headroom)


def uniform_budget(config, split_point: int, rank: int, batch_size: int, seq_len: int, headroom: float = 0.1,
                   dtype=torch.float32) -> float:
    """The least memory budget that holds blocks [0, split_point) with `rank` on every candidate matrix, plus the
    planner's headroom: where a uniform configuration (SplitLoRA's) just fits."""
    kinds = {m.kind: rank for m in candidate_matrices(config)}
    return client_memory(config, split_point, kinds, batch_size, seq_len, dtype) / (1 - headroom)


def measure_client_memory(model, split_point: int, batch: dict) -> dict[str, int]:
    """Measured bytes of the same four parts on a real client forward, backward and Adam step.

    Saved activations are counted with torch.autograd.graph.saved_tensors_hooks, once per storage,
    leaving out parameters (they are counted as weights).
    """
    client, _ = split_model(model, split_point)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    was_training = client.training
    client.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        smashed = client(batch["input_ids"], batch.get("attention_mask"))
    trainable = [p for p in client.parameters() if p.requires_grad]
    states = 0
    if trainable:
        smashed.backward(torch.ones_like(smashed))
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        opt.step()
        states = sum(v.nbytes for s in opt.state.values() for k, v in s.items() if k != "step")
        grads = sum(p.grad.nbytes for p in trainable)
        for p in trainable:
            p.grad = None
    else:
        grads = 0
    weights = {p.untyped_storage().data_ptr(): p.nbytes for p in client.parameters()}
    client.train(was_training)
    adapter_weights = sum(p.nbytes for p in trainable)
    return {"weights": sum(weights.values()) - adapter_weights, "activations": sum(saved.values()),
            "adapters": adapter_weights + grads + states, "smashed": smashed.nbytes}


# ---- compute and the cut ---------------------------------------------------------------------------------------

def block_flops(dims: Dims, batch_size: int, seq_len: int) -> float:
    """Forward + backward FLOPs of one block with frozen weights (backward computes input grads only,
    about the forward's cost): matmuls 2*P per token, attention scores and mixing 4*T*d_q per token."""
    bt = batch_size * seq_len
    forward = 2 * bt * dims.block_matmul_params + 4 * bt * seq_len * dims.d_q
    return 2 * forward


def head_flops(dims: Dims, batch_size: int, seq_len: int) -> float:
    return 2 * 2 * batch_size * seq_len * dims.d * dims.vocab


def smashed_bytes(config, batch_size: int, seq_len: int, dtype=torch.float32) -> int:
    return batch_size * seq_len * hidden_size(config) * dtype_bytes(dtype)


# ---- resources ----------------------------------------------------------------------------------

@dataclass
class ClientSpec:
    """A client's resources: memory budget (bytes), compute speed (FLOP/s), link bandwidth (bytes/s)."""
    name: str
    memory: float
    speed: float | None = None
    bandwidth: float = DEFAULT_BANDWIDTH

    def __post_init__(self):
        for name, value, unit in (("memory", self.memory, "bytes"), ("speed", self.speed, "FLOP/s"),
                                  ("bandwidth", self.bandwidth, "bytes/s")):
            if value is None and name == "speed":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"client {self.name!r}: {name} {value!r} is not allowed; a positive number of {unit}")

    @property
    def flops(self) -> float:
        """The client's speed: as given, else proportional to its budget (FLOPS_PER_BUDGET_BYTE)."""
        return self.speed or FLOPS_PER_BUDGET_BYTE * self.memory


def default_server_speed(speeds) -> float:
    """The main server's default speed: 10x the fastest client."""
    return 10 * max(speeds)



class ClientMemory:
    """Incremental client memory for the rank greedy: block activations change locally."""

    def __init__(self, config, dims: Dims, split_point: int, batch: int, seq: int, p: int):
        self.config, self.dims, self.s, self.batch, self.seq, self.p = config, dims, split_point, batch, seq, p
        self.by_layer = [{k: 0 for k in tuple(ARCHITECTURES[dims.family].candidates)} for _ in range(split_point)]
        self.fixed = p * (dims.emb_params + split_point * dims.block_params) + batch * seq * dims.d * p
        self.adapters = 0
        self.acts = _activations(dims, self.by_layer, batch, seq, p)
        self.first_live = split_point  # first block whose output requires grad

    def total(self) -> int:
        return self.fixed + self.adapters + self.acts

    def extra(self, m: Matrix, r_new: int) -> tuple[int, int]:
        """Extra bytes of raising m to r_new, and the new activation total."""
        r_old = self.by_layer[m.layer][m.kind]
        extra_adapter = ADAPTER_COPIES_BYTES * (r_new - r_old) * m.rank1_cost
        if m.layer > self.first_live:  # input already live: only this block changes
            bt = self.batch * self.seq
            old, _, _ = _block_activation_bytes(self.dims, True, self.by_layer[m.layer], bt, self.batch, self.seq, self.p)
            new, _, _ = _block_activation_bytes(self.dims, True, {**self.by_layer[m.layer], m.kind: r_new}, bt,
                                             self.batch, self.seq, self.p)
            acts = self.acts + new - old
        else:
            trial = [dict(r) for r in self.by_layer]
            trial[m.layer][m.kind] = r_new
            acts = _activations(self.dims, trial, self.batch, self.seq, self.p)
        return extra_adapter + acts - self.acts, acts

    def apply(self, m: Matrix, r_new: int, acts: int) -> None:
        r_old = self.by_layer[m.layer][m.kind]
        self.adapters += ADAPTER_COPIES_BYTES * (r_new - r_old) * m.rank1_cost
        self.by_layer[m.layer][m.kind] = r_new
        self.acts = acts
        self.first_live = min(self.first_live, m.layer)




def weight_bytes(config, dtype=torch.float32) -> int:
    """Bytes of the frozen weights of the whole model (tied LM head counted once)."""
    dims = Dims.of(getattr(config, "config", config))
    extra = dims.final_norm_params
    untied = 0 if getattr(config, "tie_word_embeddings", True) else dims.vocab * dims.d
    return dtype_bytes(dtype) * (dims.emb_params + dims.n_layers * dims.block_params + extra + untied)


