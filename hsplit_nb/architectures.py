"""The architecture table: everything that differs between model families, in one row per family.

Where the blocks live, how tokens become the first hidden state, how a block is called, the final norm,
the candidate matrices and their shapes, how weights are stored and the sizes the cost models need.
Like peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, a new family is one new row (and a test
that its split model equals the unsplit one); no other module branches on the family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Architecture:
    family: str
    blocks: str                       # module path of the block list inside the transformers model
    embeddings: tuple[str, ...]       # module paths of what turns token ids into the first hidden state
    final_norm: str                   # module path of the norm before the LM head
    rotary: str | None                # module path of the rotary-embedding table, if any
    n_blocks_field: str               # config field holding the number of blocks
    hidden_field: str                 # config field holding the model width
    candidates: dict[str, str]        # matrix kind -> module path inside one block
    default_ranks: dict[str, int]     # a sensible first choice of adapters (rank 8 on attention)
    weights_transposed: bool          # weights stored (d_in, d_out) (GPT-2's Conv1D): peft's fan_in_fan_out
    shapes: Callable                  # config -> {kind: (d_in, d_out)}
    embed: Callable                   # (embedding modules, input_ids, positions) -> first hidden state
    run_block: Callable               # (block, hidden, mask, positions, rope) -> hidden
    sizes: Callable                   # config -> dict of the cost models' sizes (see costs.Dims)
    block_activations: Callable       # the memory model of one block: what autograd saves (see costs)
    tiny: Callable                    # token ids -> (model class, config) of a 4-block, width-32 test model


# ---- LLaMA (SmolLM2 and other LLaMA-layout models) --------------------------------------------------

def _llama_shapes(config) -> dict[str, tuple[int, int]]:
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, inter), "up": (h, inter),
            "down": (inter, h)}


def _llama_sizes(config) -> dict:
    d, heads = config.hidden_size, config.num_attention_heads
    hd = getattr(config, "head_dim", None) or d // heads
    d_q, d_kv, inner = heads * hd, config.num_key_value_heads * hd, config.intermediate_size
    matmul = d * d_q + 2 * d * d_kv + d_q * d + 3 * d * inner
    bias = (d_q + 2 * d_kv + d) * bool(getattr(config, "attention_bias", False)) + \
        (2 * inner + d) * bool(getattr(config, "mlp_bias", False))
    return dict(d=d, d_q=d_q, d_kv=d_kv, inner=inner, heads=heads, head_dim=hd, emb_params=config.vocab_size * d,
                block_params=matmul + bias + 2 * d, block_matmul_params=matmul, final_norm_params=d)


def _llama_embed(modules, input_ids, positions):
    (embed_tokens,) = modules
    return embed_tokens(input_ids)


def _llama_block(block, hidden, mask, positions, rope):
    return block(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rope)


def _saved_by_attention(dims, bt: int, batch: int, seq: int) -> int:
    """Softmax log-sum-exp, and the float copy of the padding mask that SDPA saves in every block."""
    return batch * dims.heads * seq * 4 + batch * seq * seq * 4


def _lora_saves(r: dict, bt: int, p: int):
    def saved(kind, input_bytes=0):  # LoRA saves its input for dA and A's output for dB
        return (input_bytes + bt * r[kind] * p) if r.get(kind, 0) else 0
    return saved


def _llama_block_activations(dims, live: bool, r: dict, bt: int, batch: int, seq: int, p: int):
    """Bytes one LLaMA block saves for backward, whether its output requires grad, whether it saves the rotary
    tables (q or k requires grad). `live`: the block's input requires grad; `r`: rank per kind in this block.
    Norm statistics, softmax log-sum-exp and the RMSNorm input are kept in fp32."""
    d, inner, adapter = dims.d, dims.inner, _lora_saves(r, bt, p)
    norm = bt * d * 4 + bt * 4
    qkv = [k for k in ("q", "k", "v") if r.get(k, 0)]
    total = norm if live else 0
    total += (bt * d * p if qkv else 0) + sum(adapter(k) for k in qkv)
    attn_live = live or bool(qkv)
    # q, k and v repeated to every head (grouped-query attention is expanded before SDPA), output
    total += 4 * bt * dims.d_q * p + _saved_by_attention(dims, bt, batch, seq) if attn_live else 0
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


def _llama_tiny(ids: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM, LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                         tie_word_embeddings=False, **ids)


# ---- GPT-2 -------------------------------------------------------------------------------------------

def _gpt2_shapes(config) -> dict[str, tuple[int, int]]:
    h = config.n_embd
    inner = config.n_inner or 4 * h
    return {"c_attn": (h, 3 * h), "attn.c_proj": (h, h), "c_fc": (h, inner), "mlp.c_proj": (inner, h)}


def _gpt2_sizes(config) -> dict:
    d = config.n_embd
    inner = config.n_inner or 4 * d
    matmul = d * 3 * d + d * d + 2 * d * inner
    return dict(d=d, d_q=d, d_kv=d, inner=inner, heads=config.n_head, head_dim=d // config.n_head,
                emb_params=config.vocab_size * d + config.n_positions * d,
                block_params=matmul + 3 * d + d + inner + d + 4 * d, block_matmul_params=matmul,
                final_norm_params=2 * d)


def _gpt2_embed(modules, input_ids, positions):
    wte, wpe, drop = modules
    return drop(wte(input_ids) + wpe(positions))


def _gpt2_block(block, hidden, mask, positions, rope):
    return block(hidden, None, mask, position_ids=positions)


def _gpt2_block_activations(dims, live: bool, r: dict, bt: int, batch: int, seq: int, p: int):
    """Bytes one GPT-2 block saves for backward, whether its output requires grad, and False (no rotary)."""
    d, inner, adapter = dims.d, dims.inner, _lora_saves(r, bt, p)
    norm = bt * d * p + 2 * bt * 4
    total = norm if live else 0
    total += adapter("c_attn", bt * d * p)
    attn_live = live or bool(r.get("c_attn", 0))
    # fused q|k|v output and the attention output
    total += bt * 4 * d * p + _saved_by_attention(dims, bt, batch, seq) if attn_live else 0
    total += adapter("attn.c_proj", 0 if attn_live else bt * d * p)
    live2 = attn_live or bool(r.get("attn.c_proj", 0))
    total += norm if live2 else 0
    total += adapter("c_fc", bt * d * p)
    mlp_live = live2 or bool(r.get("c_fc", 0))
    total += 4 * bt * inner * p if mlp_live else 0  # the tanh GELU saves four tensors of the inner width
    total += adapter("mlp.c_proj", bt * inner * p)
    return total, mlp_live or bool(r.get("mlp.c_proj", 0)), False


def _gpt2_tiny(ids: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel, GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=512, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0, **ids)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(
        "llama", blocks="model.layers", embeddings=("model.embed_tokens",), final_norm="model.norm", rotary="model.rotary_emb",
        n_blocks_field="num_hidden_layers", hidden_field="hidden_size",
        candidates={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                    "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
        default_ranks={"q": 8, "v": 8}, weights_transposed=False, shapes=_llama_shapes, embed=_llama_embed,
        run_block=_llama_block, sizes=_llama_sizes,
        block_activations=_llama_block_activations, tiny=_llama_tiny),
    "gpt2": Architecture(
        "gpt2", blocks="transformer.h", embeddings=("transformer.wte", "transformer.wpe", "transformer.drop"),
        final_norm="transformer.ln_f", rotary=None,
        n_blocks_field="n_layer", hidden_field="n_embd",
        candidates={"c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "c_fc": "mlp.c_fc",
                    "mlp.c_proj": "mlp.c_proj"},
        default_ranks={"c_attn": 8}, weights_transposed=True, shapes=_gpt2_shapes, embed=_gpt2_embed,
        run_block=_gpt2_block, sizes=_gpt2_sizes,
        block_activations=_gpt2_block_activations, tiny=_gpt2_tiny),
}
SUPPORTED_FAMILIES = tuple(ARCHITECTURES)


def family_of(model_or_config) -> str:
    """The family's name; anything else is a clear error (the split engine knows only these layouts)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture model_type={model_type!r}; the split engine supports "
            f"{', '.join(SUPPORTED_FAMILIES)} (LLaMA family incl. SmolLM2, and GPT-2)"
        )
    return model_type


def architecture(model_or_config) -> Architecture:
    """The row of a model, a peft model around one, or a config."""
    return ARCHITECTURES[family_of(_config(model_or_config))]


def _config(obj):
    return getattr(obj, "config", obj)


def num_blocks(model_or_config) -> int:
    config = _config(model_or_config)
    return getattr(config, architecture(config).n_blocks_field)


def hidden_size(model_or_config) -> int:
    config = _config(model_or_config)
    return getattr(config, architecture(config).hidden_field)


def block_list(hf) -> torch.nn.ModuleList:
    """The transformers model's list of blocks."""
    return hf.get_submodule(architecture(hf).blocks)
