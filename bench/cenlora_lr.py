"""A diagnostic beside the comparison, not part of it: is CenLoRA's weak finish in setting (a) the price of its
learning rate? CenLoRA takes all clients' steps of a round one after another (10 steps of batch 4 at lr 1e-3),
where a federated client takes 2 and the server averages. This reruns CenLoRA, seed 0, setting (a), with the
comparison's protocol at smaller learning rates (validation PPL only: no generation) and sets the curves beside
the comparison's own run. The comparison keeps lr 1e-3 for every method: no method is tuned there.

Each run is a resumable folder under bench/results/cenlora_lr/; results: bench/results/cenlora_lr.csv, .json, .png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from hsplit_nb.comparison import ComparisonConfig  # noqa: E402
from hsplit_nb.experiment import run_experiment  # noqa: E402
from hsplit_nb.io import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COMPARISON_RUN = RESULTS / "comparison" / "a-paper" / "cenlora" / "seed0" / "results.csv"


def curves(lrs: list[float], data: str | None, threads: int) -> pd.DataFrame:
    torch.set_num_threads(threads)
    base = ComparisonConfig.preset("comparison").experiment("a-paper", "cenlora", 0)
    base = base.replace(final_metrics=False, **({"data": data} if data else {}))
    frames = [pd.read_csv(COMPARISON_RUN).assign(lr=base.lr, source="the comparison's run")]
    for lr in lrs:
        out = RESULTS / "cenlora_lr" / f"lr{lr:g}"
        rows = run_experiment(base.replace(lr=lr), out_dir=out, figures=False)
        frames.append(rows.assign(lr=lr, source="this diagnostic"))
    keep = ["lr", "source", "round", "val_ppl", "train_loss"]
    return pd.concat([f[keep] for f in frames], ignore_index=True)


def plot(df: pd.DataFrame, dest: Path) -> None:
    import matplotlib.pyplot as plt

    from hsplit_nb.plots import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for lr, part in df[df["round"] > 0].groupby("lr"):
        ax.plot(part["round"], part["val_ppl"], marker="o", label=f"CenLoRA, lr {lr:g}")
    ax.set(xlabel="round (10 pooled steps of batch 4 each)", ylabel="validation PPL",
           title="CenLoRA, setting (a), seed 0")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, dest.parent, dest.name)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-4])  # what was run (1e-4 was stopped)
    ap.add_argument("--data", default=None, help="the E2E folder (default: the preset's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    df = curves(args.lrs, args.data, args.threads)
    atomic_write_text(RESULTS / "cenlora_lr.csv", df.to_csv(index=False))
    final = df.sort_values("round").groupby("lr").tail(1).set_index("lr")["val_ppl"]
    best = df[df["round"] > 0].groupby("lr")["val_ppl"].min()
    atomic_write_json(RESULTS / "cenlora_lr.json", {
        "benchmark": "cenlora_lr", "final_ppl": {f"{k:g}": v for k, v in final.items()},
        "best_ppl": {f"{k:g}": v for k, v in best.items()}, "threads": args.threads, "machine": machine()})
    plot(df, RESULTS / "cenlora_lr")
    print(pd.DataFrame({"final_ppl": final, "best_ppl": best}).round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
