"""Command line: `python -m hsplit_nb reproduce|quickstart|run|distributed|plan-paper|make-data`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path


def _ranks(text: str) -> dict[str, int]:
    try:
        return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"ranks must look like q=8,v=8, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; a positive integer")
    return value


def _field_value(text: str) -> tuple[str, object]:
    from .io import read_value

    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; FIELD=VALUE, e.g. server_adapter_budget=2e6")
    return name.strip(), read_value(value)


def _data_arg(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("'' is not allowed; 'builtin' or a folder with devset.csv and "
                                         "testset_w_refs.csv")
    return text


# every command takes --debug: show the traceback instead of one line per error
_COMMON = argparse.ArgumentParser(add_help=False)
_COMMON.add_argument("--debug", action="store_true", help="on an error, show the full traceback")


def _add_reproduce(sub) -> None:
    rep = sub.add_parser("reproduce", parents=[_COMMON],
                         help="execute every notebook (full mode) into results/notebooks")
    rep.add_argument("--quick", action="store_true", help="quick mode (tiny model), as CI runs them")
    rep.add_argument("--only", nargs="+", help="notebooks to run, e.g. 01 03_armsc")
    rep.add_argument("--out", default="results/notebooks")
    rep.add_argument("--publish", metavar="DIR",
                     help="also write a Markdown page per notebook, with its figures, under DIR (docs/notebooks)")


def _add_quickstart(sub) -> None:
    qs = sub.add_parser("quickstart", parents=[_COMMON],
                        help="split LoRA fine-tune of SmolLM2-135M on the built-in data")
    qs.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny-llama, tiny-gpt2, a HF id or a dir")
    qs.add_argument("--split-point", type=_positive_int, default=6)
    qs.add_argument("--ranks", type=_ranks, default=None,
                    help="ranks per matrix kind or name, e.g. q=8,v=8 (default: rank 8 on q and v)")
    qs.add_argument("--steps", type=_positive_int, default=40)
    qs.add_argument("--batch-size", type=_positive_int, default=8)
    qs.add_argument("--seq-len", type=_positive_int, default=64)
    qs.add_argument("--lr", type=float, default=1e-3)
    qs.add_argument("--device", default="cpu")
    qs.add_argument("--seed", type=int, default=0)
    qs.add_argument("--out", default="results/quickstart")


def _add_experiment(sub, name: str, help_text: str, out: str):
    p = sub.add_parser(name, parents=[_COMMON], help=help_text)
    p.add_argument("--config", required=True, help="ExperimentConfig as .json or .yaml")
    p.add_argument("--data", type=_data_arg, help="'builtin' or a folder with devset.csv and testset_w_refs.csv (overrides the config)")
    p.add_argument("--methods", nargs="+", help="methods to run (overrides the config)")
    p.add_argument("--set", dest="overrides", type=_field_value, action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set server_adapter_budget=2e6 --set lr=3e-3")
    p.add_argument("--out", default=out, help="output folder (resumes if it holds a stopped run)")
    return p


def _add_distributed(sub) -> None:
    dst = _add_experiment(sub, "distributed", "the experiment with 1 server + K client processes (torchrun, loopback)",
                          "results/distributed")
    dst.add_argument("--step-timeout", type=float, default=300.0,
                     help="seconds the server waits for a client's message before counting it lost")
    dst.add_argument("--idle-timeout", type=float, default=3600.0,
                     help="seconds a client waits for the server's next command (evaluation happens meanwhile)")
    dst.add_argument("--init-timeout", type=float, default=300.0, help="seconds for the process group to form")
    dst.add_argument("--server-threads", type=int, default=None, help="torch threads of the server (default: all cores)")
    dst.add_argument("--client-threads", type=int, default=1, help="torch threads of each client process")
    dst.add_argument("--port", type=int, default=None, help="rendezvous port on 127.0.0.1 (default: a free one)")


def _add_compare(sub) -> None:
    cmp = sub.add_parser("compare", parents=[_COMMON],
                         help="methods x settings x seeds, each run in its own resumable folder, then the report")
    cmp.add_argument("--config", help="ComparisonConfig as .yaml or .json (default: configs/comparison.yaml)")
    cmp.add_argument("--data", type=_data_arg, help="'builtin' or a folder with devset.csv and testset_w_refs.csv")
    cmp.add_argument("--settings", nargs="+", help="only these settings")
    cmp.add_argument("--methods", nargs="+", help="only these methods")
    cmp.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
    cmp.add_argument("--out", default="results/comparison", help="one folder per (setting, method, seed) in here")
    cmp.add_argument("--report", default=None, help="folder for the merged tables and figures (default: --out)")
    cmp.add_argument("--report-only", action="store_true", help="train nothing: merge what is finished")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hsplit_nb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_reproduce(sub)
    _add_quickstart(sub)
    _add_experiment(sub, "run", "run an experiment from a JSON or YAML config", "results/experiment")
    _add_distributed(sub)
    _add_compare(sub)
    again = sub.add_parser("rescore", parents=[_COMMON],
                           help="score a results folder's finished methods again from their stored outputs")
    again.add_argument("--out", required=True, help="the results folder")
    paper = sub.add_parser("plan-paper", parents=[_COMMON],
                           help="ARMSC plans for LLaMA-2-7B and GPT-2-L at 5-20 GB (no weights)")
    paper.add_argument("--batch-size", type=_positive_int, default=8)
    paper.add_argument("--seq-len", type=_positive_int, default=128)
    data = sub.add_parser("make-data", parents=[_COMMON], help="regenerate the built-in data under data/builtin")
    data.add_argument("--seed", type=int, default=0)
    return parser


def _config(args):
    from .config import ExperimentConfig

    cfg = ExperimentConfig.load(args.config)
    overrides = dict(args.overrides) | ({"data": args.data} if args.data is not None else {})
    return cfg.replace(**overrides) if overrides else cfg


def _make_data(args) -> int:
    from .data import write_builtin

    for path in write_builtin(seed=args.seed):
        print(path)
    return 0


def _run(args) -> int:
    from .experiment import run_experiment

    df = run_experiment(_config(args), args.methods, args.out)
    final = df.sort_values("round").groupby("method", sort=False).tail(1)
    print(final[["method", "round", "val_ppl", "sim_time_s", "wall_time_s"]].to_string(index=False))
    metrics = df.attrs["metrics"]
    if not metrics.empty:
        print(metrics.drop(columns=["outputs"]).round(4).to_string(index=False))
    print(f"results in {args.out}/")
    return 0


def _compare(args) -> int:
    from .comparison import ComparisonConfig, run_comparison, write_report
    from .config import CONFIGS

    ccfg = ComparisonConfig.load(args.config or CONFIGS / "comparison.yaml").with_data(args.data)
    ccfg.runs(args.settings, args.methods, args.seeds)  # a selection that names nothing known is an error
    if not args.report_only:
        run_comparison(ccfg, args.out, args.settings, args.methods, args.seeds, data=args.data)
    tables = write_report(ccfg, args.out, args.report or args.out)
    runs = tables["comparison"]
    if runs.empty:
        print("no finished run yet")
        return 0
    cols = [c for c in ("setting", "method", "seeds", "final_ppl_mean", "final_ppl_std", "time_to_t50_s_mean",
                        "reached_t50", "BLEU_mean") if c in tables["comparison_summary"]]
    print(tables["comparison_summary"][cols].round(4).to_string(index=False))
    print(f"{len(runs)} runs; tables and figures in {args.report or args.out}/")
    return 0


def _rescore(args) -> int:
    from .experiment import rescore

    df = rescore(args.out)
    print(df.attrs["metrics"].drop(columns=["outputs"], errors="ignore").round(4).to_string(index=False))
    return 0


def _distributed(args) -> int:
    from .distributed import launch

    df = launch(_config(args), args.out, args.methods, step_timeout=args.step_timeout, idle_timeout=args.idle_timeout,
                init_timeout=args.init_timeout, server_threads=args.server_threads,
                client_threads=args.client_threads, port=args.port)
    final = df.sort_values("round").groupby("method", sort=False).tail(1)
    print(final[["method", "round", "val_ppl", "present", "wall_time_s"]].to_string(index=False))
    if not df.attrs["lost"].empty:
        print("lost clients:\n" + df.attrs["lost"].to_string(index=False))
    wire = df.attrs["wire"]
    print("bytes on the wire per method:\n" + wire.groupby("method").sum(numeric_only=True).T.to_string())
    print(f"results in {args.out}/ (logs in {args.out}/logs)")
    return 0


def _plan_paper(args) -> int:
    from .paper import paper_scale_plans

    for name, p in paper_scale_plans(args.batch_size, args.seq_len).items():
        print(f"### {name} (batch {args.batch_size} x {args.seq_len} tokens, fp16 weights; "
              f"step {p.step_latency * 1e3:.0f} ms simulated, server {p.server_time * 1e3:.0f} ms)\n")
        print(p.frame().round(3).to_string(index=False) + "\n")
    return 0


def _reproduce(args) -> int:
    from .reproduce import run_notebooks

    run_notebooks(args.out, quick=args.quick, only=args.only)
    if args.publish:
        from .reproduce import publish

        for page in publish(args.out, args.publish):
            print(f"wrote {page}")
    return 0


def _quickstart(args) -> int:
    from .quickstart import QuickstartConfig, run_split_lora

    cfg = QuickstartConfig(model=args.model, split_point=args.split_point, ranks=args.ranks, steps=args.steps,
                           batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, device=args.device,
                           seed=args.seed)
    result = run_split_lora(cfg, args.out)
    print(json.dumps({k: result[k] for k in ("ppl_before", "ppl_after", "train_seconds")}, indent=2))
    print(f"validation PPL {result['ppl_before']:.3f} -> {result['ppl_after']:.3f}; results in {args.out}/")
    return 0


COMMANDS = {"make-data": _make_data, "run": _run, "compare": _compare, "rescore": _rescore,
            "distributed": _distributed, "plan-paper": _plan_paper, "reproduce": _reproduce, "quickstart": _quickstart}


def _error_log(args, exc: BaseException) -> Path | None:
    """Write the traceback beside the results (or in the temp folder); None if nowhere is writable."""
    out = Path(getattr(args, "out", "") or tempfile.gettempdir())
    log = (out if out.is_dir() else Path(tempfile.gettempdir())) / "hsplit_nb-error.log"
    try:
        log.write_text("".join(traceback.format_exception(exc)))
    except OSError:
        return None
    return log


def main(argv=None) -> int:
    """Run a command. An error prints one line (`error: ...`, with the traceback's log file) and exits 1;
    --debug shows the traceback instead."""
    args = _parser().parse_args(argv)
    if args.debug:
        return COMMANDS[args.command](args)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted; start the same command again to resume", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001  (the whole point: one line for any error)
        log = _error_log(args, exc)
        text = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        where = f" [traceback: {log}; --debug shows it]" if log is not None else ""
        print(f"error: {text}{where}", file=sys.stderr)
        return 1


def interrupt_on_signals() -> None:
    """SIGTERM and SIGHUP interrupt this process as Ctrl-C does: a write in progress removes its temporary file,
    a launcher stops its processes."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, interrupt)


def cli() -> None:
    """The command line's process (`interrupt_on_signals`); an interrupted command ends at once (results are
    written atomically, so nothing is lost), where a helper thread or child (METEOR's Java) would otherwise keep the
    interpreter waiting."""
    interrupt_on_signals()
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    cli()
