"""IWI calibration cost: one RNGWP calibration step against one ordinary split LoRA step, SmolLM2-135M.

Batch 8 x 64, rank 8 on q and v, split point 6. The two alternate on the same batches (order flipping
every round); medians are compared. Writes bench/results/iwi_cost.json. Target: ratio <= 2.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_step_args, alternate, lora_setup, machine  # noqa: E402

from hsplit_nb.importance import rngwp_scores  # noqa: E402
from hsplit_nb.io import atomic_write_json  # noqa: E402
from hsplit_nb.split import split_model, split_step  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    add_step_args(ap, steps=10)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "iwi_cost.json"))
    args = ap.parse_args(argv)

    model, tok, batches = lora_setup(args)
    client, server = split_model(model, args.split_point)
    copt = torch.optim.AdamW([p for p in client.parameters() if p.requires_grad], lr=1e-4)
    sopt = torch.optim.AdamW([p for p in server.parameters() if p.requires_grad], lr=1e-4)

    kinds = {"lora_step": lambda b: split_step(client, server, b, copt, sopt),
             "calibration": lambda b: rngwp_scores(model, b, split_point=args.split_point)}
    times = alternate(kinds, batches, args.warmup, args.device)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["calibration"] / med["lora_step"]
    print(f"ordinary split LoRA step: median {med['lora_step']:.3f} s")
    print(f"RNGWP calibration step:   median {med['calibration']:.3f} s")
    print(f"ratio calibration / step: {ratio:.3f} (target <= 2)")
    result = {"benchmark": "iwi_cost", "model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "split_point": args.split_point, "ranks": "q=8,v=8", "device": args.device, "steps_each": args.steps,
              "median_seconds_lora_step": med["lora_step"], "median_seconds_calibration": med["calibration"],
              "ratio_calibration_over_step": ratio, "target_ratio_max": 2.0, "machine": machine()}
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
