"""The comparison a reviewer can check: every method in three settings with several seeds (configs/comparison.yaml).

Each (setting, method, seed) runs in its own folder under bench/results/comparison/ (committed when finished:
tables only, no weights; checkpoints of an unfinished run are ignored by git), so the comparison can be run
in pieces and across sessions: start it again and it goes on where it stopped. `--settings`, `--methods` and
`--seeds` select a part. After every run the merged tables and figures are rewritten in bench/results/:
comparison.csv (one row per setting, method and seed), comparison_summary.csv (means and spreads),
comparison_claims.csv, comparison_targets.csv, comparison_*.png, and comparison.json (the machine, and the
wall time of all finished runs added up).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from hsplit_nb.comparison import ComparisonConfig, finished, run_comparison, write_report  # noqa: E402
from hsplit_nb.io import atomic_write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def report(ccfg: ComparisonConfig, out: Path, config_path: str) -> None:
    tables = write_report(ccfg, out, RESULTS)
    runs = tables["comparison"]
    specs = ccfg.runs()
    done = [s for s in specs if finished(s, out)]
    wall = float(runs["wall_time_run_s"].sum()) if "wall_time_run_s" in runs else 0.0
    atomic_write_json(RESULTS / "comparison.json", {
        "benchmark": "comparison", "config": ccfg.model_dump(), "config_file": config_path,
        "runs_finished": len(done), "runs_total": len(specs), "wall_seconds_all_finished_runs": wall,
        "machine": machine()})
    print(f"{len(done)} of {len(specs)} runs finished; {wall / 3600:.2f} h of wall time in them")
    if "comparison_summary" in tables:
        s = tables["comparison_summary"]
        cols = [c for c in ("setting", "method", "seeds", "final_ppl_mean", "final_ppl_std", "time_to_t50_s_mean",
                            "reached_t50", "BLEU_mean", "CIDEr_mean") if c in s]
        print(s[cols].round(4).to_string(index=False))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "comparison.yaml"))
    ap.add_argument("--data", required=True, help="folder with devset.csv and testset_w_refs.csv (../shared/e2e)")
    ap.add_argument("--settings", nargs="+")
    ap.add_argument("--methods", nargs="+")
    ap.add_argument("--seeds", nargs="+", type=int)
    ap.add_argument("--out", default=str(RESULTS / "comparison"))
    ap.add_argument("--report-only", action="store_true", help="train nothing: merge the finished runs")
    args = ap.parse_args(argv)
    ccfg = ComparisonConfig.load(args.config)
    out = Path(args.out)
    if not args.report_only:
        for spec in ccfg.runs(args.settings, args.methods, args.seeds):  # one at a time: a report after each
            if not finished(spec, out):
                run_comparison(ccfg, out, [spec.setting], [spec.method], [spec.seed], data=args.data,
                               progress=False)
                report(ccfg, out, args.config)
                print(f"finished {spec.setting} / {spec.method} / seed {spec.seed}", flush=True)
    report(ccfg, out, args.config)


if __name__ == "__main__":
    main()
