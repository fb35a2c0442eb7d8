"""The regime map on SmolLM2-135M's config (no weights, no training): for the comparison's budget settings, every
combination of the server's speed (2, 5, 10, 50 x the fastest client), the links (1e7, 1e8, 1e9 B/s) and the local
steps per round (1, 2, 5, 10, 20, 50), HSplitLoRA's and SplitLoRA's plans and round times (`hsplit_nb.regime`).

Writes bench/results/regime_map.csv (one row per point and method), regime_map_<budgets>.png and regime_map.json
(the run time of each budget set's 4 x 6 x 3 grid, the machine). Batch 4 x 96, one calibration per round.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from hsplit_nb.config import PAPER_BUDGET_FRACTIONS  # noqa: E402
from hsplit_nb.costs import weight_bytes  # noqa: E402
from hsplit_nb.io import atomic_write_json, atomic_write_text  # noqa: E402
from hsplit_nb.models import model_config  # noqa: E402
from hsplit_nb.plots import plot_regime_map, save_figure  # noqa: E402
from hsplit_nb.regime import regime_map  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = {"a-paper": PAPER_BUDGET_FRACTIONS, "b-binding": [0.2984, 0.5222, 0.746, 0.9699, 1.1937]}


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    config, out = model_config(args.model), Path(args.out)
    w = weight_bytes(config)
    frames, seconds = [], {}
    for name, fractions in BUDGETS.items():
        t0 = time.perf_counter()
        frames.append(regime_map(config, {name: [f * w for f in fractions]}, batch_size=4, seq_len=96))
        seconds[name] = time.perf_counter() - t0
        print(f"{name}: 4 x 3 x 6 grid in {seconds[name]:.1f} s")
    df = pd.concat(frames, ignore_index=True)
    atomic_write_text(out / "regime_map.csv", df.to_csv(index=False))
    for name in BUDGETS:
        save_figure(plot_regime_map(df, name), out, f"regime_map_{name}")
    h = df[df["method"] == "hsplitlora"]
    atomic_write_json(out / "regime_map.json", {
        "benchmark": "regime_map", "model": args.model, "batch_size": 4, "seq_len": 96,
        "budgets": BUDGETS, "seconds_per_grid": seconds,
        "points_with_distinct_splits": int((h["distinct_splits"] >= 3).sum()), "points": int(len(h)),
        "machine": machine()})
    print(h[h["local_steps"] == 10][["budgets", "server_ratio", "bandwidth", "splits", "round_vs_splitlora"]]
          .to_string(index=False))
    return df


if __name__ == "__main__":
    main()
