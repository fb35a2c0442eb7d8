"""The quickest results: split LoRA fine-tuning of one client and one server, PPL before and after
(`python -m hsplit_nb quickstart`), and notebook 00's small federation, one setting of the comparison
shortened to a few minutes."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from pydantic import Field

from .adapters import add_adapters
from .config import Device, Int, Positive, PositiveInt, TypedConfig, check_device
from .data import E2EDataset, load_builtin, loader
from .federation import Diverged
from .io import atomic_write_json, atomic_write_text
from .metrics import perplexity
from .architectures import architecture
from .models import load_model
from .split import split_model, split_step


class QuickstartConfig(TypedConfig):
    """One client and one server on the built-in data; typed like the experiment config."""
    model: str = Field("smollm2-135m", min_length=1)
    split_point: PositiveInt = 6
    ranks: dict[str, Int] | None = None  # None: rank 8 on q and v (LLaMA) or on the fused c_attn (GPT-2)
    steps: PositiveInt = 40
    batch_size: PositiveInt = 8
    seq_len: Int = Field(64, ge=2)
    lr: Positive = 1e-3
    eval_examples: PositiveInt = 128
    seed: Int = Field(0, ge=0)
    device: Device = "cpu"


def _trainable(module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def run_split_lora(cfg: QuickstartConfig, out_dir=None, progress: bool = True) -> dict:
    """Fine-tune with split LoRA on the built-in data; returns (and writes) PPL before/after and step log."""
    check_device(cfg.device)
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
            if not math.isfinite(result.loss):
                raise Diverged(f"quickstart diverged at step {step + 1}: the training loss is {result.loss}. The "
                               f"likely cause is the learning rate ({cfg.lr:g}); try a smaller one")
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

    if not math.isfinite(ppl_after):
        raise Diverged(f"quickstart diverged: the validation perplexity after training is {ppl_after}; "
                       f"try a smaller learning rate than {cfg.lr:g}")
    summary = {"config": {**cfg.model_dump(), "ranks": ranks}, "ppl_before": ppl_before, "ppl_after": ppl_after,
               "train_seconds": train_seconds, "client_trainable_params": sum(p.numel() for p in client_params),
               "server_trainable_params": sum(p.numel() for p in server_params),
               "bytes_up_total": sum(r["bytes_up"] for r in log), "bytes_down_total": sum(r["bytes_down"] for r in log)}
    steps = pd.DataFrame(log)
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_text(out / "steps.csv", steps.to_csv(index=False))
        atomic_write_json(out / "metrics.json", summary)
    return {**summary, "steps": steps}


QUICKSTART_PRESETS = {True: ("comparison_quick",), False: ("comparison_edge", "comparison")}
QUICKSTART_SETTING = {True: "b-binding", False: "edge-b"}


def quickstart_config(quick: bool, setting: str | None = None, seed: int = 0, **overrides):
    """Notebook 00's federation: a setting of the comparison presets (full mode: the edge comparison's `edge-b`,
    where ARMSC gives the clients different split points, or a setting of the recorded comparison; quick mode:
    comparison_quick's `b-binding`), shortened to 1 round (quick) or 2 rounds of 5 local steps, 8 or 32
    validation examples, no generation. Overrides of None keep these defaults."""
    from .comparison import ComparisonConfig
    from .config import _bad

    setting = setting or QUICKSTART_SETTING[quick]
    presets = [ComparisonConfig.preset(name) for name in QUICKSTART_PRESETS[quick]]
    ccfg = next((c for c in presets if setting in c.settings), None)
    if ccfg is None:
        _bad("setting", setting, f"one of {', '.join(s for c in presets for s in c.settings)}")
    short = {"rounds": 1, "val_examples": 8} if quick else {"rounds": 2, "local_steps": 5, "val_examples": 32}
    chosen = {k: v for k, v in overrides.items() if v is not None}
    return ccfg.experiment(setting, "hsplitlora", seed).replace(**{**short, **chosen, "final_metrics": False})


def initial_plans(cfg, methods=("hsplitlora", "splitlora")) -> pd.DataFrame:
    """Each split method's configuration before its first round, without training: per method and client, the
    budget, the split point, the adapters on the device and the sum of their ranks. `attrs["n_blocks"]`: the depth."""
    from .clientdata import load_splits
    from .experiment import _Run

    splits, rows = load_splits(cfg), []
    for name in methods:
        run = _Run(cfg.replace(methods=[name]), name, splits, None)
        run.fed.start()
        for c in run.fed.clients:
            device = run.fed.aggregation.device_ranks(c)
            rows.append({"method": name, "client": c.name, "budget_bytes": c.spec.memory, "split_point": c.split_point,
                         "device_adapters": len(device), "device_rank_sum": sum(device.values())})
        n_blocks = run.fed.L
    frame = pd.DataFrame(rows)
    frame.attrs["n_blocks"] = n_blocks
    return frame


def run_quickstart(cfg, methods, out_dir) -> pd.DataFrame:
    """Train `methods` on `cfg` in one resumable folder per setting under out_dir (methods already there are read
    back, not trained again) and return every method's rounds."""
    from .experiment import run_experiment

    return run_experiment(cfg, methods=list(methods), out_dir=Path(out_dir) / f"run-{cfg.fingerprint()}")
