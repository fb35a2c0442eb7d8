"""Multi-process vs in-process throughput: one server and two client processes (torchrun, gloo, loopback)
against the in-process simulation of the same federation, in one run.

SmolLM2-135M, batch 8 x 64, two clients at fixed different split points, HSplitLoRA without IWI (no
calibrations, so every timed second is local steps and aggregation). Time per client step = a round's
wall time (the server's, which includes waiting for clients) / (local steps x clients); rounds after the
first are timed, and the two kinds of run alternate. Writes bench/results/distributed.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from hsplit_nb.distributed import launch  # noqa: E402
from hsplit_nb.config import preset  # noqa: E402
from hsplit_nb.experiment import run_experiment  # noqa: E402
from hsplit_nb.io import atomic_write_json  # noqa: E402


def per_step(df, cfg) -> list[float]:
    """Seconds per client step in each timed round (wall_time_s is cumulative over rounds)."""
    rows = df.sort_values("round").set_index("round")
    walls = rows["wall_time_s"].diff().dropna()
    return [walls[r] / (cfg.local_steps * rows.loc[r, "present"]) for r in walls.index if r >= 2]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="builtin", help="'builtin' or a folder with the E2E csv files")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run; the first is warmup")
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="alternating pairs of runs")
    ap.add_argument("--split-points", type=int, nargs=2, default=[2, 4])
    ap.add_argument("--server-threads", type=int, default=None)
    ap.add_argument("--client-threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "distributed.json"))
    args = ap.parse_args(argv)

    cfg = preset("cpu_scale", model=args.model, data=args.data, num_clients=2, budgets=[0.5, 0.5], rounds=args.rounds,
                 local_steps=args.local_steps, batch_size=8, seq_len=64, split_points=args.split_points,
                 val_examples=16, final_metrics=False, methods=["hsplitlora-no-iwi"])
    times = {"in_process": [], "multi_process": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            order = ["in_process", "multi_process"] if i % 2 == 0 else ["multi_process", "in_process"]
            for kind in order:
                if kind == "in_process":
                    df = run_experiment(cfg, progress=False)
                else:
                    df = launch(cfg, Path(tmp) / f"run{i}", server_threads=args.server_threads,
                                client_threads=args.client_threads, progress=True)
                times[kind] += per_step(df, cfg)
                print(f"{kind}: {statistics.median(per_step(df, cfg)):.3f} s per client step")
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["in_process"] / med["multi_process"]
    result = {"benchmark": "distributed", "model": args.model, "clients": 2, "split_points": args.split_points,
              "method": "hsplitlora-no-iwi", "batch_size": 8, "seq_len": 64, "local_steps": args.local_steps,
              "rounds_timed": args.rounds - 1, "repeats": args.repeats, "backend": "gloo",
              "server_threads": args.server_threads, "client_threads": args.client_threads,
              "seconds_per_client_step": times, "median_seconds_in_process": med["in_process"],
              "median_seconds_multi_process": med["multi_process"],
              "throughput_ratio_multi_over_in_process": ratio, "target_ratio_min": 0.9, "machine": machine()}
    print(f"in-process:    median {med['in_process']:.3f} s per client step")
    print(f"multi-process: median {med['multi_process']:.3f} s per client step")
    print(f"throughput ratio multi / in-process: {ratio:.3f} (target >= 0.9)")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
