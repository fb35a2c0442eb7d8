"""The paper's scale without its weights: LLaMA-2-7B and GPT-2-L configs, the 5-20 GB budgets, and the ARMSC
plans they give (`python -m hsplit_nb plan-paper`, notebook 03)."""
from __future__ import annotations

import torch

from .costs import ClientSpec
from .planner import Plan, plan


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


def paper_scale_plans(batch_size: int = 8, seq_len: int = 128, n_clients: int = 5) -> dict[str, Plan]:
    """ARMSC plans for LLaMA-2-7B and GPT-2-L (fp16 frozen weights) at the paper's 5-20 GB budgets,
    uniform importance, default speeds (proportional to budget) and server (10x the richest)."""
    clients = [ClientSpec(f"client{k}", b) for k, b in enumerate(paper_budgets(n_clients))]
    return {name: plan(cfg, clients, batch_size=batch_size, seq_len=seq_len, dtype=torch.float16)
            for name, cfg in paper_configs().items()}
