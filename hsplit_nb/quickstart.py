"""The main job for now: split LoRA fine-tuning of one client and one server, PPL before and after."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from .adapters import add_adapters
from .data import E2EDataset, load_builtin, loader
from .io import atomic_write_json, atomic_write_text
from .metrics import perplexity
from .architectures import architecture
from .models import load_model
from .split import split_model, split_step


@dataclass
class QuickstartConfig:
    model: str = "smollm2-135m"
    split_point: int = 6
    ranks: dict | None = None  # None: rank 8 on q and v (LLaMA) or on the fused c_attn (GPT-2)
    steps: int = 40
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 1e-3
    eval_examples: int = 128
    seed: int = 0
    device: str = "cpu"


def _trainable(module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def run_split_lora(cfg: QuickstartConfig, out_dir=None, progress: bool = True) -> dict:
    """Fine-tune with split LoRA on the built-in data; returns (and writes) PPL before/after and step log."""
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={cfg.steps}, batch_size={cfg.batch_size}")
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, device=cfg.device)
    ranks = cfg.ranks or dict(architecture(model).default_ranks)
    model = add_adapters(model, ranks)
    client, server = split_model(model, cfg.split_point)
    train = E2EDataset(load_builtin("train"), tokenizer, cfg.seq_len)
    dev = E2EDataset(load_builtin("dev").head(cfg.eval_examples), tokenizer, cfg.seq_len)
    dev_batches = loader(dev, tokenizer, cfg.batch_size)

    ppl_before = perplexity(model, dev_batches, cfg.device)
    client_params, server_params = _trainable(client), _trainable(server)
    client_opt = torch.optim.AdamW(client_params, lr=cfg.lr) if client_params else None
    server_opt = torch.optim.AdamW(server_params, lr=cfg.lr) if server_params else None

    model.train()
    log, step, start = [], 0, time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="split LoRA steps", disable=not progress)
    while step < cfg.steps:
        for batch in loader(train, tokenizer, cfg.batch_size, shuffle=True, seed=cfg.seed + step):
            batch = {k: v.to(cfg.device) for k, v in batch.items()}
            result = split_step(client, server, batch, client_opt, server_opt)
            log.append({"step": step, "loss": result.loss, "bytes_up": result.bytes_up,
                        "bytes_down": result.bytes_down})
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.3f}")
            if step == cfg.steps:
                break
    bar.close()
    train_seconds = time.perf_counter() - start
    ppl_after = perplexity(model, dev_batches, cfg.device)

    summary = {"config": {**asdict(cfg), "ranks": ranks}, "ppl_before": ppl_before, "ppl_after": ppl_after,
               "train_seconds": train_seconds, "client_trainable_params": sum(p.numel() for p in client_params),
               "server_trainable_params": sum(p.numel() for p in server_params),
               "bytes_up_total": sum(r["bytes_up"] for r in log), "bytes_down_total": sum(r["bytes_down"] for r in log)}
    steps = pd.DataFrame(log)
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_text(out / "steps.csv", steps.to_csv(index=False))
        atomic_write_json(out / "metrics.json", summary)
    return {**summary, "steps": steps}
