"""The edge comparison at larger scale on one GPU in about ten minutes (issue 24, "On a GPU").

1. A timing probe: HSplitLoRA and SplitLoRA on the edge comparison's protocol (configs/comparison_edge.yaml) for
   20 local steps (2 rounds of 10), one validation pass and 64 test MRs each, on the device; the plan is made as
   part of each run.
2. From the probe, the number of local steps the budget affords (at least --min-steps, 240 by default, in
   10-step rounds) for every run of the comparison with `--workers` runs at a time, with every test MR (630) and
   256 validation rows; written as a comparison config (`comparison_gpu.yaml` under --out) with the probe's
   figures beside it (`probe.json`).
3. The comparison itself, by bench/comparison.py with that config, its report under --out.

On a CPU the same logic runs with the tiny model (`--model tiny-llama --data builtin --device cpu`), which is how
it is tested. Expected on one H100: the probe about 1 minute, 240+ local steps for 21 runs in about 10 minutes
with 4 runs at a time (SmolLM2-135M steps take tens of milliseconds there; to be measured: this script records it).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from hsplit_nb.comparison import ComparisonConfig  # noqa: E402
from hsplit_nb.experiment import run_experiment  # noqa: E402
from hsplit_nb.io import atomic_write_json, atomic_write_text  # noqa: E402

HERE = Path(__file__).resolve().parent
PROBE_STEPS, PROBE_MRS, VAL_ROWS, TEST_MRS = 20, 64, 256, 630


def probe(ccfg: ComparisonConfig, args) -> dict:
    """Seconds per local step (training and aggregation), per validation pass and per generated MR, from two short
    runs of the protocol on the device (the slower method's figures are kept: every run must fit)."""
    setting = next(iter(ccfg.settings))
    figures = {}
    for method in ("hsplitlora", "splitlora"):
        cfg = ccfg.experiment(setting, method, 0).replace(
            rounds=PROBE_STEPS // ccfg.common.get("local_steps", 10), data=args.data, device=args.device,
            eval_mrs=PROBE_MRS, model=args.model, **_overrides(args))
        start = time.perf_counter()
        df = run_experiment(cfg, out_dir=Path(args.out) / "probe" / method, progress=False, figures=False)
        total = time.perf_counter() - start
        train = float(df["wall_time_s"].max())  # the rounds' training and aggregation
        figures[method] = {"seconds_total": total, "seconds_training": train, "local_steps": PROBE_STEPS,
                           "seconds_per_local_step": train / PROBE_STEPS, "evaluations": cfg.rounds + 1,
                           "seconds_evaluation_and_generation": max(total - train, 1e-9),
                           "validation_rows": cfg.val_examples, "test_mrs": PROBE_MRS}
    return figures


def afford(figures: dict, runs: int, workers: int, budget_s: float, min_steps: int, round_steps: int) -> int:
    """Local steps per run that `budget_s` affords for `runs` runs, `workers` at a time: each run pays its steps and
    its evaluation (validation passes and generation scaled from the probe to 256 rows and 630 MRs)."""
    worst = max(figures.values(), key=lambda f: f["seconds_per_local_step"])
    overhead = worst["seconds_evaluation_and_generation"] * max(VAL_ROWS / worst["validation_rows"],
                                                                 TEST_MRS / worst["test_mrs"])
    per_run = budget_s * min(workers, runs) / runs - overhead
    steps = int(per_run / worst["seconds_per_local_step"]) // round_steps * round_steps
    return max(min_steps, steps)


def scaled_config(ccfg: ComparisonConfig, steps: int, args) -> dict:
    round_steps = ccfg.common.get("local_steps", 10)
    common = {**ccfg.common, "rounds": math.ceil(steps / round_steps), "val_examples": VAL_ROWS,
              "eval_mrs": TEST_MRS, "device": args.device, "model": args.model}
    return {**ccfg.model_dump(), "common": {**common, **_overrides(args)}}


def _overrides(args) -> dict:
    """What the command line changes of the protocol: the budgets and sequence length (the tiny model's, in tests)."""
    return {k: v for k, v in (("budgets", args.budgets), ("seq_len", args.seq_len)) if v is not None}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE.parent / "configs" / "comparison_edge.yaml"))
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default=str(HERE / "results" / "edge_gpu"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", type=float, nargs="+", help="override the protocol's budgets (the tiny model's)")
    ap.add_argument("--seq-len", type=int, help="override the protocol's sequence length (the tiny model's)")
    ap.add_argument("--budget-s", type=float, default=600.0, help="seconds for the whole comparison")
    ap.add_argument("--min-steps", type=int, default=240)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--plan-only", action="store_true", help="probe and write the config; run nothing else")
    args = ap.parse_args(argv)
    ccfg = ComparisonConfig.load(args.config)
    out = Path(args.out)
    figures = probe(ccfg, args)
    runs = len(ccfg.runs())
    steps = afford(figures, runs, args.workers, args.budget_s, args.min_steps, ccfg.common.get("local_steps", 10))
    config = scaled_config(ccfg, steps, args)
    atomic_write_text(out / "comparison_gpu.yaml", yaml.safe_dump(config, sort_keys=False))
    result = {"benchmark": "gpu_comparison", "probe": figures, "runs": runs, "workers": args.workers,
              "budget_s": args.budget_s, "local_steps_afforded": steps, "rounds": config["common"]["rounds"],
              "machine": machine()}
    atomic_write_json(out / "probe.json", result)
    print(f"probe: {figures['hsplitlora']['seconds_per_local_step']:.3f} s per local step (hsplitlora), "
          f"{figures['splitlora']['seconds_per_local_step']:.3f} (splitlora); {steps} local steps per run afforded "
          f"for {runs} runs, {args.workers} at a time, in {args.budget_s:.0f} s")
    if not args.plan_only:
        import comparison as bench_comparison  # bench/comparison.py

        bench_comparison.main(["--config", str(out / "comparison_gpu.yaml"), "--data", args.data, "--out",
                               str(out / "runs"), "--workers", str(args.workers)])
    return result


if __name__ == "__main__":
    main()
