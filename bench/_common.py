"""Shared by the benchmark scripts: where and when they ran, and timing that waits for the device."""
from __future__ import annotations

import datetime
import os
import platform
import time

import torch


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def timed(fn, device) -> float:
    """Seconds one call of fn takes, synchronising CUDA around it."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def add_step_args(ap, steps: int) -> None:
    """The options the step-timing benchmarks share (SmolLM2-135M, batch 8 x 64, split 6 by default)."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=steps, help="timed steps of each kind")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--split-point", type=int, default=6)
    ap.add_argument("--device", default="cpu")


def lora_setup(args):
    """The model with rank 8 on q and v, in training mode, and warmup + steps full-width batches."""
    from hsplit_nb.adapters import add_adapters
    from hsplit_nb.data import E2EDataset, load_builtin, loader
    from hsplit_nb.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(args.model, device=args.device)
    model = add_adapters(model, {"q": 8, "v": 8})
    model.train()
    data = E2EDataset(load_builtin("train"), tok, args.seq_len)
    batches = [b for b in loader(data, tok, args.batch_size, shuffle=True)
               if b["input_ids"].shape == (args.batch_size, args.seq_len)][: args.warmup + args.steps]
    return model, tok, [{k: v.to(args.device) for k, v in b.items()} for b in batches]


def alternate(kinds: dict, batches: list, warmup: int, device) -> dict[str, list[float]]:
    """Time each kind of step on the same batches, alternating which goes first; drop the warmup rounds."""
    from tqdm.auto import tqdm

    times = {k: [] for k in kinds}
    for i, batch in enumerate(tqdm(batches, desc="alternating steps")):
        order = list(kinds) if i % 2 == 0 else list(reversed(kinds))
        for name in order:
            t = timed(lambda: kinds[name](batch), device)
            if i >= warmup:
                times[name].append(t)
    return times
