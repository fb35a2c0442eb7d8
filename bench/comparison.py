"""The comparison a reviewer can check: every method in three settings with several seeds (configs/comparison.yaml).

Each (setting, method, seed) runs in its own folder under bench/results/comparison/ (committed when finished:
tables only, no weights; checkpoints of an unfinished run are ignored by git), so the comparison can be run
in pieces and across sessions: start it again and it goes on where it stopped. `--settings`, `--methods` and
`--seeds` select a part. After every run the merged tables and figures are rewritten in bench/results/:
comparison.csv (one row per setting, method and seed), comparison_summary.csv (means and spreads),
comparison_claims.csv, comparison_targets.csv, comparison_*.png, and comparison.json (the machine, and the
wall time of all finished runs added up, and every invocation's clock time).

`--workers N` runs N runs at a time, each in its own process with cores/N torch threads (the runs are
independent folders; a worker that finishes takes the next unclaimed run, in the comparison's seed-by-seed
order): on 2 cores, two single-threaded runs do about 1.3 times the work per minute of one run
on two threads (a training round: about 33 s on one thread beside another run, 21 s on two threads in a run of
its own).
"""
from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from hsplit_nb.comparison import ComparisonConfig, finished, run_comparison, write_report  # noqa: E402
from hsplit_nb.io import atomic_write_json, read_mapping  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def report_folder(out: Path) -> Path:
    """Where a comparison's report goes: its own output folder; the recorded comparison's (the default --out) keeps
    its report in bench/results/, where the committed figures are."""
    return RESULTS if Path(out).resolve() == (RESULTS / "comparison").resolve() else Path(out)


def report(ccfg: ComparisonConfig, out: Path, config_path: str) -> None:
    dest = report_folder(out)
    tables = write_report(ccfg, out, dest)
    runs = tables["comparison"]
    specs = ccfg.runs()
    done = [s for s in specs if finished(s, out)]
    wall = float(runs["wall_time_run_s"].sum()) if "wall_time_run_s" in runs else 0.0
    calls = _invocations(out)
    clock = sum(c["seconds"] for c in calls)
    atomic_write_json(dest / "comparison.json", {
        "benchmark": "comparison", "config": ccfg.model_dump(), "config_file": config_path,
        "runs_finished": len(done), "runs_total": len(specs), "wall_seconds_all_finished_runs": wall,
        "clock_seconds_all_invocations": clock, "invocations": calls, "machine": machine()})
    print(f"{len(done)} of {len(specs)} runs finished; {wall / 3600:.2f} h of wall time in them, "
          f"{clock / 3600:.2f} h on the clock")
    if "comparison_summary" in tables:
        s = tables["comparison_summary"]
        cols = [c for c in ("setting", "method", "seeds", "final_ppl_mean", "final_ppl_std", "time_to_t50_s_mean",
                            "reached_t50", "BLEU_mean", "CIDEr_mean") if c in s]
        print(s[cols].round(4).to_string(index=False))


def _invocations(out: Path) -> list[dict]:
    path = Path(out) / "invocations.json"
    return read_mapping(path).get("invocations", []) if path.is_file() else []


def _clock(out: Path, started: str, seconds: float, workers: int, runs: int) -> None:
    """Record (or update) this invocation's clock time, so the comparison's total survives a killed session."""
    calls = [c for c in _invocations(out) if c["started"] != started]
    calls.append({"started": started, "seconds": seconds, "workers": workers, "runs_selected": runs})
    atomic_write_json(Path(out) / "invocations.json", {"invocations": sorted(calls, key=lambda c: c["started"])})


CLAIMS = ".claims"  # under --out: one empty file per run a worker of this invocation has taken


def claim(spec, out: Path) -> bool:
    """Take a run for this worker: True for exactly one of the workers that ask (the file is created
    exclusively). The parent clears old claims when it starts, so a killed invocation's claims do not hold."""
    path = out / CLAIMS / f"{spec.setting}+{spec.method}+seed{spec.seed}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def clear_claims(out: Path) -> None:
    folder = out / CLAIMS
    if folder.is_dir():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()


def run_workers(args, argv: list[str], todo: int) -> None:
    """Start `args.workers` copies of this script, each taking the next unclaimed run until none is left, and wait
    for them."""
    n = args.workers
    threads = max(1, (os.cpu_count() or 1) // n)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    clear_claims(Path(args.out))
    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--worker", "--threads", str(threads)], env=env)
             for _ in range(n)]
    started, t0 = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    try:
        while any(p.poll() is None for p in procs):
            _clock(args.out, started, time.perf_counter() - t0, n, todo)
            time.sleep(30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
        _clock(args.out, started, time.perf_counter() - t0, n, todo)
        clear_claims(Path(args.out))
    bad = [p.returncode for p in procs if p.returncode]
    if bad:
        raise SystemExit(f"a worker failed (exit status {bad[0]}); its run resumes when started again")


def run_worker(ccfg, out, args) -> None:
    """Run the selected unfinished runs one at a time (with `--worker`, only those no other worker has claimed),
    rewriting the report after each."""
    import torch

    # a stopped worker (SIGTERM from the parent or the session's end) unwinds, so the run's elapsed.json keeps
    # the seconds it spent before the stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.threads:
        torch.set_num_threads(args.threads)
    for spec in ccfg.runs(args.settings, args.methods, args.seeds):
        if finished(spec, out) or (args.worker and not claim(spec, out)):
            continue
        run_comparison(ccfg, out, [spec.setting], [spec.method], [spec.seed], data=args.data, progress=False)
        report(ccfg, out, args.config)
        print(f"finished {spec.setting} / {spec.method} / seed {spec.seed}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "comparison.yaml"))
    ap.add_argument("--data", required=True, help="folder with devset.csv and testset_w_refs.csv (../shared/e2e)")
    ap.add_argument("--settings", nargs="+")
    ap.add_argument("--methods", nargs="+")
    ap.add_argument("--seeds", nargs="+", type=int)
    ap.add_argument("--out", default=str(RESULTS / "comparison"))
    ap.add_argument("--report-only", action="store_true", help="train nothing: merge the finished runs")
    ap.add_argument("--workers", type=int, default=1, help="runs at a time, each in its own process (default 1)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of --workers: claims its runs
    ap.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error(f"--workers must be at least 1, got {args.workers}")
    ccfg = ComparisonConfig.load(args.config).with_data(args.data)  # finished runs are checked against these files
    out = Path(args.out)
    if args.worker:  # one of the parent's workers: runs until none is left unclaimed; the parent reports last
        run_worker(ccfg, out, args)
        return
    if not args.report_only:
        todo = sum(not finished(s, out) for s in ccfg.runs(args.settings, args.methods, args.seeds))
        if args.workers > 1:
            run_workers(args, argv, todo)
        else:
            started, t0 = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
            try:
                run_worker(ccfg, out, args)
            finally:
                _clock(args.out, started, time.perf_counter() - t0, 1, todo)
    report(ccfg, out, args.config)


if __name__ == "__main__":
    main()
