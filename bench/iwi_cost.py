"""IWI calibration cost: a local step that IWI rides on against an ordinary split LoRA step, SmolLM2-135M.

The calibrating step is the ordinary step with RNGWP's hooks on (every frozen candidate weight on both sides of
the cut scores x^T g_out in the step's own backward); the separate calibration that it replaced (its own forward
and backward on a batch, no update) is timed beside them for reference. Rank 8 on q and v, split point 6; all
kinds alternate on the same batches (order flipping every round); medians are compared. The ratio
calibrating / plain step is what the clock and ARMSC charge (costs.CALIBRATION_STEP_FACTOR). Writes
bench/results/iwi_cost.json. Target: ratio <= 1.4.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_step_args, alternate, lora_setup, machine  # noqa: E402

from hsplit_nb.costs import CALIBRATION_STEP_FACTOR  # noqa: E402
from hsplit_nb.importance import riding, rngwp_scores, side_matrices  # noqa: E402
from hsplit_nb.io import atomic_write_json  # noqa: E402
from hsplit_nb.split import split_model, split_step, unwrap  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    add_step_args(ap, steps=10)
    ap.set_defaults(batch_size=4, seq_len=96)  # the comparisons' batch
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "iwi_cost.json"))
    args = ap.parse_args(argv)

    model, tok, batches = lora_setup(args)
    client, server = split_model(model, args.split_point)
    copt = torch.optim.AdamW([p for p in client.parameters() if p.requires_grad], lr=1e-4)
    sopt = torch.optim.AdamW([p for p in server.parameters() if p.requires_grad], lr=1e-4)
    config = unwrap(model).config
    cli, srv = (side_matrices(config, args.split_point, side) for side in ("client", "server"))

    def calibrating_step(b):
        with riding(model, cli, client.embeddings) as c, riding(model, srv) as s:
            split_step(client, server, b, copt, sopt)
        return {**c, **s}

    kinds = {"lora_step": lambda b: split_step(client, server, b, copt, sopt), "calibrating_step": calibrating_step,
             "separate_calibration": lambda b: rngwp_scores(model, b, split_point=args.split_point)}
    times = alternate(kinds, batches, args.warmup, args.device)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["calibrating_step"] / med["lora_step"]
    print(f"ordinary split LoRA step:       median {med['lora_step']:.3f} s")
    print(f"step with IWI riding on it:     median {med['calibrating_step']:.3f} s")
    print(f"separate calibration (before):  median {med['separate_calibration']:.3f} s")
    print(f"ratio calibrating / plain step: {ratio:.3f} (target <= 1.4; the clock charges {CALIBRATION_STEP_FACTOR})")
    result = {"benchmark": "iwi_cost", "model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "split_point": args.split_point, "ranks": "q=8,v=8", "device": args.device, "steps_each": args.steps,
              "median_seconds_lora_step": med["lora_step"], "median_seconds_calibrating_step": med["calibrating_step"],
              "median_seconds_separate_calibration": med["separate_calibration"],
              "ratio_calibrating_over_step": ratio,
              "ratio_before_separate_step_charged_as_extra": (med["lora_step"] + med["separate_calibration"]) /
              med["lora_step"],
              "charged_factor": CALIBRATION_STEP_FACTOR, "target_ratio_max": 1.4, "machine": machine()}
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
