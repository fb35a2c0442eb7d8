"""ARMSC: memory and latency models from a model config alone, and the split-point and rank planner.

Memory of client k at split s with ranks r (bytes): frozen weights of the embeddings and s blocks,
the activations its blocks save for backward at the configured batch and sequence length, the
adapters (4 bytes x 4 copies: weight, grad, two Adam moments) and the smashed-data buffer.
The activation model follows what autograd really saves when base weights are frozen: a block
saves nothing until something upstream of it (or inside it) is trainable, so where the first
adapter sits matters. `measure_client_memory` checks the model against a real forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import torch

from .adapters import Matrix, candidate_matrices, resolve_ranks
from .models import family_of
from .split import hidden_size, num_blocks, split_model

ADAPTER_COPIES_BYTES = 4 * 4  # fp32 weight, grad, Adam exp_avg, exp_avg_sq
DEFAULT_RANK_LEVELS = (0, 2, 4, 8, 16)
DEFAULT_BANDWIDTH = 1e8  # bytes/s (800 Mbit/s)
FLOPS_PER_BUDGET_BYTE = 1e3  # default client speed: a 20 GB budget computes at 20 TFLOP/s


def dtype_bytes(dtype) -> int:
    if isinstance(dtype, int):
        return dtype
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Dims:
    """What the models need to know about an architecture."""
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

    @classmethod
    def of(cls, config) -> "Dims":
        family = family_of(config)
        d = hidden_size(config)
        if family == "llama":
            heads = config.num_attention_heads
            hd = getattr(config, "head_dim", None) or d // heads
            d_q, d_kv, inner = heads * hd, config.num_key_value_heads * hd, config.intermediate_size
            matmul = d * d_q + 2 * d * d_kv + d_q * d + 3 * d * inner
            bias = (d_q + 2 * d_kv + d) * bool(getattr(config, "attention_bias", False)) + \
                (2 * inner + d) * bool(getattr(config, "mlp_bias", False))
            block, emb = matmul + bias + 2 * d, config.vocab_size * d
        else:
            heads, hd = config.n_head, d // config.n_head
            d_q = d_kv = d
            inner = config.n_inner or 4 * d
            matmul = d * 3 * d + d * d + 2 * d * inner
            block = matmul + 3 * d + d + inner + d + 4 * d
            emb = config.vocab_size * d + config.n_positions * d
        return cls(family, num_blocks(config), d, d_q, d_kv, inner, heads, hd, config.vocab_size, emb, block, matmul)


# ---- memory ---------------------------------------------------------------------------------

def _block_activation_bytes(dims: Dims, live: bool, r: dict[str, int], bt: int, batch: int, seq: int,
                            p: int) -> tuple[int, bool, bool]:
    """Bytes one block saves for backward, whether its output requires grad, whether it saves the rotary
    tables (LLaMA: q or k requires grad).

    `live`: the block's input requires grad. `r`: rank per kind in this block (0 = no adapter).
    Norm statistics, softmax log-sum-exp and LLaMA's RMSNorm input are kept in fp32.
    """
    d, inner = dims.d, dims.inner
    # softmax log-sum-exp, and the float copy of the padding mask that SDPA saves in every block
    lse = batch * dims.heads * seq * 4 + batch * seq * seq * 4

    def adapter(kind, input_bytes=0):  # LoRA saves its input for dA and A's output for dB
        return (input_bytes + bt * r[kind] * p) if r.get(kind, 0) else 0

    total = 0
    if dims.family == "llama":
        norm = bt * d * 4 + bt * 4
        qkv = [k for k in ("q", "k", "v") if r.get(k, 0)]
        total += norm if live else 0
        total += (bt * d * p if qkv else 0) + sum(adapter(k) for k in qkv)
        attn_live = live or bool(qkv)
        # q, k and v repeated to every head (grouped-query attention is expanded before SDPA), output
        total += 4 * bt * dims.d_q * p + lse if attn_live else 0
        # o's input is a view of the attention output, already saved when attention is live
        total += adapter("o", 0 if attn_live else bt * dims.d_q * p)
        live2 = attn_live or bool(r.get("o", 0))
        total += norm if live2 else 0
        gate, up = bool(r.get("gate", 0)), bool(r.get("up", 0))
        total += (bt * d * p if gate or up else 0) + adapter("gate") + adapter("up")
        # SiLU saves its input; the product saves each factor the other one needs for its grad
        mlp_saved = 3 if live2 or (gate and up) else 2 if gate else 1 if up else 0
        total += mlp_saved * bt * inner * p
        total += adapter("down", bt * inner * p)
        rope = live or bool(r.get("q", 0)) or bool(r.get("k", 0))
        return total, live2 or gate or up or bool(r.get("down", 0)), rope
    norm = bt * d * p + 2 * bt * 4
    total += norm if live else 0
    total += adapter("c_attn", bt * d * p)
    attn_live = live or bool(r.get("c_attn", 0))
    total += bt * 4 * d * p + lse if attn_live else 0  # fused q|k|v output and the attention output
    total += adapter("attn.c_proj", 0 if attn_live else bt * d * p)
    live2 = attn_live or bool(r.get("attn.c_proj", 0))
    total += norm if live2 else 0
    total += adapter("c_fc", bt * d * p)
    mlp_live = live2 or bool(r.get("c_fc", 0))
    total += 4 * bt * inner * p if mlp_live else 0  # the tanh GELU saves four tensors of the inner width
    total += adapter("mlp.c_proj", bt * inner * p)
    return total, mlp_live or bool(r.get("mlp.c_proj", 0)), False


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
    ranks = resolve_ranks(config, ranks)
    return sum(ADAPTER_COPIES_BYTES * ranks.get(m.name, 0) * m.rank1_cost for m in candidate_matrices(config)
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


# ---- latency ------------------------------------------------------------------------------------

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


def step_latency(config, split_points, speeds, bandwidths, server_speed: float, batch_size: int, seq_len: int,
                 dtype=torch.float32) -> dict:
    """The spec's latency model of one local step of the whole federation (seconds).

    c_k = flops_client(s_k) / F_k + 2 * bytes(smashed) / b_k;  S = sum_k flops_server(L - s_k) / F_server;
    T = max(max_k c_k, S).
    """
    config = getattr(config, "config", config)
    dims = Dims.of(config)
    fb, hf = block_flops(dims, batch_size, seq_len), head_flops(dims, batch_size, seq_len)
    transfer = 2 * smashed_bytes(config, batch_size, seq_len, dtype)
    client = [s * fb / f + transfer / b for s, f, b in zip(split_points, speeds, bandwidths)]
    server = sum((dims.n_layers - s) * fb + hf for s in split_points) / server_speed
    return {"step": max(max(client), server), "server": server, "clients": client}


# ---- the planner ----------------------------------------------------------------------------------

@dataclass
class ClientSpec:
    """A client's resources: memory budget (bytes), compute speed (FLOP/s), link bandwidth (bytes/s)."""
    name: str
    memory: float
    speed: float | None = None
    bandwidth: float = DEFAULT_BANDWIDTH

    def __post_init__(self):
        if not (isinstance(self.memory, (int, float)) and self.memory > 0 and math.isfinite(self.memory)):
            raise ValueError(f"client {self.name!r}: memory budget must be a positive number of bytes, "
                             f"got {self.memory!r}")
        if self.speed is not None and not self.speed > 0:
            raise ValueError(f"client {self.name!r}: speed must be positive FLOP/s, got {self.speed!r}")
        if not self.bandwidth > 0:
            raise ValueError(f"client {self.name!r}: bandwidth must be positive bytes/s, got {self.bandwidth!r}")

    @property
    def flops(self) -> float:
        """The client's speed: as given, else proportional to its budget (FLOPS_PER_BUDGET_BYTE)."""
        return self.speed or FLOPS_PER_BUDGET_BYTE * self.memory


def default_server_speed(speeds) -> float:
    """The main server's default speed: 10x the fastest client."""
    return 10 * max(speeds)


@dataclass
class ClientPlan:
    name: str
    split_point: int
    ranks: dict[str, int]  # every candidate matrix, device- and server-side
    memory: int            # predicted client bytes
    budget: float
    latency: float         # c_k, seconds per local step
    server_adapter_bytes: int = 0

    def device_ranks(self) -> dict[str, int]:
        return {n: r for n, r in self.ranks.items() if _layer(n) < self.split_point}

    def server_ranks(self) -> dict[str, int]:
        return {n: r for n, r in self.ranks.items() if _layer(n) >= self.split_point}


@dataclass
class Plan:
    clients: list[ClientPlan]
    step_latency: float
    server_time: float
    settings: dict = field(default_factory=dict)

    def frame(self) -> pd.DataFrame:
        """One row per client: split point, total device/server rank, memory against budget, latency."""
        return pd.DataFrame([{
            "client": c.name, "split_point": c.split_point, "budget_GB": c.budget / 1e9,
            "memory_GB": c.memory / 1e9, "memory_use": c.memory / c.budget,
            "device_rank_total": sum(c.device_ranks().values()), "server_rank_total": sum(c.server_ranks().values()),
            "device_adapters": sum(r > 0 for r in c.device_ranks().values()),
            "server_adapters": sum(r > 0 for r in c.server_ranks().values()),
            "latency_s": c.latency} for c in self.clients])


def _layer(name: str) -> int:
    return int(name.split(".")[2])


def _next_level(levels: tuple[int, ...], r: int) -> int | None:
    higher = [x for x in levels if x > r]
    return min(higher) if higher else None


def _phi(r: int) -> float:
    return math.log2(1 + r)


class _ClientMemory:
    """Incremental client memory for the rank greedy: block activations change locally."""

    def __init__(self, config, dims: Dims, split_point: int, batch: int, seq: int, p: int):
        self.config, self.dims, self.s, self.batch, self.seq, self.p = config, dims, split_point, batch, seq, p
        self.by_layer = [{k: 0 for k in _kinds(dims.family)} for _ in range(split_point)]
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


def _kinds(family: str) -> tuple[str, ...]:
    from .adapters import CANDIDATES

    return tuple(CANDIDATES[family])


def _greedy(matrices: list[Matrix], importance: dict[str, float], levels: tuple[int, ...], room: float,
            extra_fn, apply_fn) -> dict[str, int]:
    """Raise the (matrix, next level) with the largest Ibar * (phi(r') - phi(r)) / extra bytes until
    nothing more fits in `room` bytes. Ties go to the earlier matrix (lower layer, then kind order)."""
    ranks = {m.name: 0 for m in matrices}
    order = {m.name: i for i, m in enumerate(matrices)}
    while True:
        best, best_key = None, None
        for m in matrices:
            r_next = _next_level(levels, ranks[m.name])
            if r_next is None:
                continue
            extra, state = extra_fn(m, r_next)
            if extra > room:
                continue
            gain = importance.get(m.name, 0.0) * (_phi(r_next) - _phi(ranks[m.name]))
            key = (gain / max(extra, 1), -order[m.name])
            if best_key is None or key > best_key:
                best, best_key = (m, r_next, extra, state), key
        if best is None:
            return ranks
        m, r_next, extra, state = best
        apply_fn(m, r_next, state)
        ranks[m.name] = r_next
        room -= extra


def plan(config, clients: list[ClientSpec], importance: dict[str, float] | None = None, batch_size: int = 8,
         seq_len: int = 64, rank_levels=DEFAULT_RANK_LEVELS, dtype=torch.float32, headroom: float = 0.1,
         server_speed: float | None = None, server_adapter_budget: float | None = None,
         fixed_split_points: list[int] | None = None) -> Plan:
    """ARMSC: split points minimising the step latency under every client's memory, then greedy ranks.

    `importance` maps matrix names to Ibar (None: uniform). `fixed_split_points` skips the split search
    (used by ablations). Returns one ClientPlan per client.
    """
    config = getattr(config, "config", config)
    dims, p = Dims.of(config), dtype_bytes(dtype)
    levels = tuple(sorted(set(int(r) for r in rank_levels)))
    if not levels or levels[0] != 0 or len(levels) < 2 or any(r < 0 for r in levels):
        raise ValueError(f"rank_levels must contain 0 and at least one positive rank, got {tuple(rank_levels)!r}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom!r}")
    if not clients:
        raise ValueError("plan needs at least one client")
    names = [c.name for c in clients]
    if len(set(names)) != len(names):
        raise ValueError(f"client names must be unique, got {names}")
    matrices = candidate_matrices(config)
    if importance is None:
        importance = {m.name: 1.0 for m in matrices}
    unknown = set(importance) - {m.name for m in matrices}
    if unknown:
        raise ValueError(f"importance names unknown matrices, e.g. {sorted(unknown)[:3]}")
    richest = max(c.memory for c in clients)
    speeds = [c.flops for c in clients]
    server_speed = server_speed or default_server_speed(speeds)
    r_min = levels[1]
    L = dims.n_layers

    def min_memory(s: int) -> int:
        device = [m for m in matrices if m.layer < s]
        top = max(device, key=lambda m: (importance.get(m.name, 0.0), -m.layer))
        return client_memory(config, s, {top.name: r_min}, batch_size, seq_len, p)

    min_mem = {s: min_memory(s) for s in range(1, L)}
    feasible = []
    for c in clients:
        fits = [s for s in range(1, L) if min_mem[s] <= (1 - headroom) * c.memory]
        if not fits:
            need = min_mem[1] / (1 - headroom)
            raise ValueError(f"client {c.name!r}: budget {c.memory / 1e9:.3f} GB ({c.memory:.0f} bytes) fits no split "
                             f"point; the smallest budget that fits is {need / 1e9:.3f} GB ({math.ceil(need)} bytes, "
                             f"split point 1 with headroom {headroom})")
        feasible.append(fits)

    fb, hf = block_flops(dims, batch_size, seq_len), head_flops(dims, batch_size, seq_len)
    transfer = 2 * smashed_bytes(config, batch_size, seq_len, p)

    def c_time(k: int, s: int) -> float:
        return s * fb / speeds[k] + transfer / clients[k].bandwidth

    def evaluate(splits):
        return step_latency(config, splits, speeds, [c.bandwidth for c in clients], server_speed, batch_size,
                            seq_len, p)

    if fixed_split_points is not None:
        if len(fixed_split_points) != len(clients):
            raise ValueError(f"fixed_split_points needs one split per client ({len(clients)}), "
                             f"got {len(fixed_split_points)}")
        for k, s in enumerate(fixed_split_points):
            if s not in feasible[k]:
                raise ValueError(f"client {clients[k].name!r}: fixed split point {s} does not fit its budget "
                                 f"(fitting split points: {feasible[k][0]}..{feasible[k][-1]})")
        splits = list(fixed_split_points)
    else:
        # For each candidate bound T, every client takes its deepest fitting split with c_k <= T; the
        # resulting step time is evaluated exactly. Ties go to the larger T, i.e. the deeper splits.
        candidates = sorted({c_time(k, s) for k in range(len(clients)) for s in feasible[k]})
        best = None
        for T in candidates:
            splits = []
            for k in range(len(clients)):
                ok = [s for s in feasible[k] if c_time(k, s) <= T * (1 + 1e-12)]
                splits.append(max(ok) if ok else feasible[k][0])
            t = evaluate(splits)["step"]
            if best is None or t <= best[0] * (1 + 1e-12):
                best = (t, splits)
        splits = best[1]

    # ranks: device side under each client's memory; server side under a per-client adapter budget
    plans_device, memories = [], []
    for k, c in enumerate(clients):
        s = splits[k]
        mem = _ClientMemory(config, dims, s, batch_size, seq_len, p)
        device = [m for m in matrices if m.layer < s]
        room = (1 - headroom) * c.memory - mem.total()
        ranks = _greedy(device, importance, levels, room, mem.extra, mem.apply)
        plans_device.append(ranks)
        memories.append(mem.total())
    if server_adapter_budget is None:
        richest_k = max(range(len(clients)), key=lambda k: clients[k].memory)
        server_adapter_budget = adapter_bytes(config, plans_device[richest_k])
    out = []
    timing = evaluate(splits)
    for k, c in enumerate(clients):
        s = splits[k]
        server_side = [m for m in matrices if m.layer >= s]
        server_ranks: dict[str, int] = {}

        def s_extra(m, r_new):
            return ADAPTER_COPIES_BYTES * (r_new - server_ranks.get(m.name, 0)) * m.rank1_cost, None

        def s_apply(m, r_new, _state):
            server_ranks[m.name] = r_new

        _greedy(server_side, importance, levels, server_adapter_budget, s_extra, s_apply)
        ranks = {**plans_device[k], **{m.name: server_ranks.get(m.name, 0) for m in server_side}}
        out.append(ClientPlan(c.name, s, ranks, memories[k], c.memory, timing["clients"][k],
                              adapter_bytes(config, ranks, range(s, L))))
    return Plan(out, timing["step"], timing["server"],
                {"batch_size": batch_size, "seq_len": seq_len, "rank_levels": levels, "dtype_bytes": p,
                 "headroom": headroom, "server_speed": server_speed, "client_speeds": speeds,
                 "server_adapter_budget": server_adapter_budget})


# ---- paper scale --------------------------------------------------------------------------------

def paper_configs() -> dict:
    """LLaMA-2-7B and GPT-2-L configs built in code (no weights, no hub)."""
    from transformers import GPT2Config, LlamaConfig

    return {
        "llama-2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
        "gpt2-large": GPT2Config(vocab_size=50257, n_positions=1024, n_embd=1280, n_layer=36, n_head=20),
    }


def paper_budgets(n_clients: int = 5, low: float = 5e9, high: float = 20e9) -> list[float]:
    """The paper's heterogeneous budgets, uniform in [low, high], evenly spaced (deterministic)."""
    if n_clients == 1:
        return [high]
    return [low + (high - low) * i / (n_clients - 1) for i in range(n_clients)]


def weight_bytes(config, dtype=torch.float32) -> int:
    """Bytes of the frozen weights of the whole model (tied LM head counted once)."""
    dims = Dims.of(getattr(config, "config", config))
    extra = 2 * dims.d if dims.family == "gpt2" else dims.d
    untied = 0 if getattr(config, "tie_word_embeddings", True) else dims.vocab * dims.d
    return dtype_bytes(dtype) * (dims.emb_params + dims.n_layers * dims.block_params + extra + untied)


def paper_scale_plans(batch_size: int = 8, seq_len: int = 128, n_clients: int = 5) -> dict[str, Plan]:
    """ARMSC plans for LLaMA-2-7B and GPT-2-L (fp16 frozen weights) at the paper's 5-20 GB budgets,
    uniform importance, default speeds (proportional to budget) and server (10x the richest)."""
    clients = [ClientSpec(f"client{k}", b) for k, b in enumerate(paper_budgets(n_clients))]
    return {name: plan(cfg, clients, batch_size=batch_size, seq_len=seq_len, dtype=torch.float16)
            for name, cfg in paper_configs().items()}
