"""Split-engine overhead: split LoRA steps vs plain peft LoRA steps on the unsplit model, same batches.

SmolLM2-135M, batch 8 x 64 tokens, rank 8 on q and v, split point 6. The two kinds of step alternate
(their order flips every round) and the medians are compared. Writes bench/results/engine_overhead.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_step_args, alternate, lora_setup, machine  # noqa: E402

from hsplit_nb.io import atomic_write_json  # noqa: E402
from hsplit_nb.split import split_model, split_step  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    add_step_args(ap, steps=20)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "engine_overhead.json"))
    args = ap.parse_args(argv)

    model, tok, batches = lora_setup(args)

    params = [p for p in model.parameters() if p.requires_grad]
    plain_opt = torch.optim.AdamW(params, lr=1e-4)
    client, server = split_model(model, args.split_point)
    client_opt = torch.optim.AdamW([p for p in client.parameters() if p.requires_grad], lr=1e-4)
    server_opt = torch.optim.AdamW([p for p in server.parameters() if p.requires_grad], lr=1e-4)

    def plain(batch):
        plain_opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        plain_opt.step()

    def split(batch):
        split_step(client, server, batch, client_opt, server_opt)

    times = alternate({"plain": plain, "split": split}, batches, args.warmup, args.device)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"benchmark": "engine_overhead", "model": args.model, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "split_point": args.split_point, "ranks": "q=8,v=8", "device": args.device,
              "steps_each": args.steps, "median_seconds_plain": med["plain"], "median_seconds_split": med["split"],
              "ratio_split_over_plain": med["split"] / med["plain"], "target_ratio_max": 1.05,
              "machine": machine()}
    print(f"plain peft LoRA step: median {med['plain']:.3f} s")
    print(f"split LoRA step:      median {med['split']:.3f} s")
    print(f"ratio split / plain:  {result['ratio_split_over_plain']:.3f} (target <= 1.05)")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
