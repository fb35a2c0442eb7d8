"""Every method on SmolLM2-135M, five clients with the paper's heterogeneous budgets, on real E2E data.

devset.csv is the training pool (10% of its MRs held out for validation PPL); testset_w_refs.csv gives
the generation metrics on a subset of MRs small enough for a CPU. Writes the per-round results and
figures to --out (resumable), and the summary to bench/results/quality.csv / quality.json and
bench/results/quality_*.png.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from hsplit_nb.config import preset  # noqa: E402
from hsplit_nb.experiment import run_experiment, summarize  # noqa: E402
from hsplit_nb.io import atomic_write_json, atomic_write_text  # noqa: E402
from hsplit_nb.methods import METHODS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True, help="folder with devset.csv and testset_w_refs.csv (../shared/e2e)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--eval-mrs", type=int, default=20)
    ap.add_argument("--val-examples", type=int, default=128)
    ap.add_argument("--partition", default="iid", choices=["iid", "dirichlet"])
    ap.add_argument("--out", default="results/quality")
    args = ap.parse_args(argv)

    cfg = preset("cpu_scale", model=args.model, data=args.data, rounds=args.rounds, local_steps=args.local_steps,
                 batch_size=args.batch_size, seq_len=args.seq_len, eval_mrs=args.eval_mrs,
                 val_examples=args.val_examples, partition=args.partition, iwi_interval=args.local_steps,
                 methods=args.methods)
    start = time.perf_counter()
    df = run_experiment(cfg, out_dir=args.out)
    elapsed = time.perf_counter() - start
    table = summarize(df, df.attrs["metrics"])
    pd.set_option("display.width", 200)
    print(table[["method", "final_ppl", "best_ppl", "rounds_to_target", "sim_time_to_target_s",
                 "time_ratio_vs_hsplitlora"]].round(3).to_string(index=False))
    print(f"common target PPL: {table['target_ppl'].iloc[0]:.3f}")
    metric_cols = [c for c in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr") if c in table]
    if metric_cols:
        print(table[["method"] + metric_cols].round(4).to_string(index=False))
    print(f"wall time of this invocation: {elapsed / 60:.1f} min")
    atomic_write_text(RESULTS / "quality.csv", table.to_csv(index=False))
    atomic_write_json(RESULTS / "quality.json", {"benchmark": "quality", "config": cfg.to_dict(),
                                                 "wall_seconds_this_invocation": elapsed, "machine": machine(),
                                                 "summary": table.to_dict("records")})
    for f in ("ppl_rounds.png", "ppl_time.png", "bytes_per_round.png"):
        shutil.copyfile(Path(args.out) / f, RESULTS / f"quality_{f}")
    return table


if __name__ == "__main__":
    main()
