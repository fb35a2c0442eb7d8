"""ARMSC memory model against measurement on SmolLM2-135M.

For each split point and rank setting: the predicted client bytes (from the config alone) against the
measured bytes of the client's parameters, adapter grads and Adam state, tensors saved for backward
(saved_tensors_hooks) and the smashed data. Writes bench/results/memory_model.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from hsplit_nb.adapters import add_adapters  # noqa: E402
from hsplit_nb.data import E2EDataset, load_builtin, loader  # noqa: E402
from hsplit_nb.io import atomic_write_json  # noqa: E402
from hsplit_nb.models import load_model  # noqa: E402
from hsplit_nb.costs import client_memory, measure_client_memory  # noqa: E402

SETTINGS = {
    "q,v r8": {"q": 8, "v": 8},
    "all r4": 4,
    "mixed (late, MLP-heavy)": {"model.layers.3.mlp.down_proj": 16, "model.layers.10.self_attn.o_proj": 4,
                                "model.layers.20.mlp.gate_proj": 8, "v": 2},
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 4, 8, 15, 22, 29])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "memory_model.json"))
    args = ap.parse_args(argv)

    base, tok = load_model(args.model)
    data = E2EDataset(load_builtin("train"), tok, args.seq_len)
    batch = next(b for b in loader(data, tok, args.batch_size, shuffle=True)
                 if b["input_ids"].shape == (args.batch_size, args.seq_len))
    rows = []
    for label, ranks in SETTINGS.items():
        model, _ = load_model(args.model)
        model = add_adapters(model, ranks)
        for s in tqdm(args.splits, desc=label):
            measured = measure_client_memory(model, s, batch)
            predicted = client_memory(model.config, s, ranks, args.batch_size, args.seq_len, breakdown=True)
            err = (sum(predicted.values()) - sum(measured.values())) / sum(measured.values())
            rows.append({"setting": label, "split_point": s, "predicted_bytes": sum(predicted.values()),
                         "measured_bytes": sum(measured.values()), "relative_error": err,
                         "predicted": predicted, "measured": measured})
            print(f"{label:26s} s={s:2d}  predicted {sum(predicted.values()) / 2**20:8.2f} MiB  "
                  f"measured {sum(measured.values()) / 2**20:8.2f} MiB  error {err:+.4%}")
        del model
    worst = max(rows, key=lambda r: abs(r["relative_error"]))
    print(f"worst relative error: {worst['relative_error']:+.4%} ({worst['setting']}, split {worst['split_point']}); "
          f"target |error| <= 10%")
    result = {"benchmark": "memory_model", "model": args.model, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "rows": rows, "worst_abs_relative_error": abs(worst["relative_error"]),
              "target_max": 0.10, "machine": machine()}
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
