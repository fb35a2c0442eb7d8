"""A comparison: methods x settings x seeds, each (setting, method, seed) run in its own resumable folder.

The comparison config (configs/comparison.yaml) names a base preset, the fields every run shares, the
settings (each a set of overrides, e.g. budgets) and the seeds; core methods run every seed, extras the
`extra_seeds`. `run_comparison` runs what is selected and not yet finished, so a long comparison can be
done in pieces and across sessions; `collect` merges every finished folder into tidy tables.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from .config import ExperimentConfig, NonNegativeInt, TypedConfig, _bad, preset
from .io import atomic_write_json, read_mapping, read_whole_csv
from .methods import METHODS
from .reporting import METRICS, add_times_to_targets, targets
from .runfolder import RunFolderError

Seeds = Annotated[list[NonNegativeInt], Field(min_length=1)]


class Setting(TypedConfig):
    """One setting of the comparison: what it is for, its overrides of the shared fields, its seeds and methods."""
    about: str = ""
    overrides: dict[str, Any] = Field(default_factory=dict)
    seeds: Seeds | None = None  # None: the comparison's seeds
    methods: Annotated[list[str], Field(min_length=1)] | None = None  # None: every core and extra method


class ComparisonConfig(TypedConfig):
    """Which methods run in which settings with which seeds, on one base preset."""
    base: str = "cpu_scale"
    common: dict[str, Any] = Field(default_factory=dict)  # fields every run shares (rounds, lr, eval_mrs, ...)
    settings: Annotated[dict[str, Setting], Field(min_length=1)]
    seeds: Seeds = Field(default_factory=lambda: [0, 1, 2])
    core: Annotated[list[str], Field(min_length=1)]
    extras: list[str] = Field(default_factory=list)
    extra_seeds: Seeds = Field(default_factory=lambda: [0])

    @model_validator(mode="after")
    def _check(self):
        for field in ("core", "extras"):
            for m in getattr(self, field):
                if m not in METHODS:
                    _bad(field, m, f"a method, one of {', '.join(METHODS)}")
        both = set(self.core) & set(self.extras)
        if both:
            _bad("extras", sorted(both), "methods that are not also in core")
        for field, seeds in [("seeds", self.seeds), ("extra_seeds", self.extra_seeds)] + \
                [(f"settings.{k}.seeds", v.seeds) for k, v in self.settings.items() if v.seeds]:
            if len(set(seeds)) != len(seeds):
                _bad(field, seeds, "distinct seeds (a repeated seed would count one run as two)")
        for name, setting in self.settings.items():
            for m in setting.methods or []:
                if m not in self.core + self.extras:
                    _bad(f"settings.{name}.methods", m, f"a method of core or extras: {', '.join(self.core + self.extras)}")
            self.experiment(name, self.core[0], 0)  # every setting must make a valid experiment config
        return self

    @classmethod
    def load(cls, path) -> "ComparisonConfig":
        return cls(**read_mapping(path))

    @classmethod
    def preset(cls, name: str) -> "ComparisonConfig":
        """A comparison preset from configs/ (`comparison`, `comparison_quick`)."""
        from .config import CONFIGS

        path = CONFIGS / f"{name}.yaml"
        if not path.is_file():
            _bad("comparison", name, f"one of {sorted(p.stem for p in CONFIGS.glob('comparison*.yaml'))}")
        return cls.load(path)

    def narrow(self, settings=None, methods=None, seeds=None, **common) -> "ComparisonConfig":
        """A smaller comparison on the same protocol: some settings, methods and seeds, some shared fields changed
        (a notebook's live demonstration). Chosen seeds replace every setting's own."""
        self.runs(settings, methods, seeds)  # unknown names are an error
        core = [m for m in self.core if not methods or m in methods]
        extras = [m for m in self.extras if not methods or m in methods]
        chosen = core + extras
        kept = {k: {**v.model_dump(), **({"seeds": None} if seeds else {}),
                    "methods": None if v.methods is None else [m for m in v.methods if m in chosen]}
                for k, v in self.settings.items() if not settings or k in settings}
        kept = {k: v for k, v in kept.items() if v["methods"] is None or v["methods"]}
        return ComparisonConfig(**{**self.model_dump(), "settings": kept, "core": core or extras,
                                   "extras": extras if core else [], "seeds": seeds or self.seeds,
                                   "extra_seeds": seeds or self.extra_seeds, "common": {**self.common, **common}})

    def with_data(self, data) -> "ComparisonConfig":
        """The same comparison on another data folder (None: unchanged): every run, every check of a finished run
        and the report then read the same files."""
        if data is None:
            return self
        return ComparisonConfig(**{**self.model_dump(), "common": {**self.common, "data": str(data)}})

    def fingerprint(self) -> str:
        """A short hash of the whole comparison: one output folder per distinct protocol (as
        `ExperimentConfig.fingerprint` gives one per setting)."""
        return hashlib.sha1(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:10]

    def experiment(self, setting: str, method: str, seed: int) -> ExperimentConfig:
        """The experiment config of one run: base preset, common fields, the setting's overrides, seed."""
        over = {**self.common, **self.settings[setting].overrides, "seed": seed, "methods": [method]}
        try:
            return preset(self.base, **over)
        except ValueError as exc:
            raise type(exc)(f"comparison setting {setting!r}: {exc}") from None

    def homogeneous(self, setting: str) -> bool:
        """Every client of the setting at one budget (judged on its first core method's config)."""
        budgets = self.experiment(setting, (self.settings[setting].methods or self.core)[0], 0).budgets
        return len(set(budgets)) == 1

    def seeds_of(self, setting: str, method: str) -> list[int]:
        own = self.settings[setting].seeds
        if method in self.extras:
            return [s for s in self.extra_seeds if own is None or s in own]
        return own if own is not None else self.seeds

    def runs(self, settings=None, methods=None, seeds=None) -> list["RunSpec"]:
        """Every (setting, method, seed) of the comparison, optionally only the selected ones; seed by seed, so
        that a comparison stopped part-way has whole seeds of every setting and method."""
        for field, chosen, known in (("settings", settings, self.settings),
                                     ("methods", methods, self.core + self.extras)):
            for x in chosen or []:
                if x not in known:
                    _bad(field, x, f"one of {', '.join(known)}")
        keys = [(seed, setting, method) for setting, spec in self.settings.items()
                for method in self.core + self.extras if spec.methods is None or method in spec.methods
                for seed in self.seeds_of(setting, method)
                if (not settings or setting in settings) and (not methods or method in methods)
                and (seeds is None or seed in seeds)]
        keys.sort(key=lambda k: k[0])  # stable: within a seed, settings and methods keep their order
        if not keys:
            _bad("seeds" if seeds else "methods", seeds or methods, "a selection with at least one run; this one "
                 f"selects none (seeds {self.seeds}, extras' {self.extra_seeds})")
        return [RunSpec(setting, method, seed, self.experiment(setting, method, seed)) for seed, setting, method in keys]


@dataclass
class RunSpec:
    setting: str
    method: str
    seed: int
    cfg: ExperimentConfig

    def folder(self, out) -> Path:
        return Path(out) / self.setting / self.method / f"seed{self.seed}"


ELAPSED = "elapsed.json"


def _table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError):  # not written yet, or written before any row
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path} cannot be read as results ({' '.join(str(exc).split())[:200]}); delete the "
                             "run's folder to run it again") from None


def _final_metrics(spec: RunSpec, out) -> dict | None:
    """The run's final metrics row (or its note that no client fits), or None while it is unfinished. A finished
    run is a proven one: measured with this protocol on these data files (the fingerprint), its rounds reaching
    the last, its metrics whole; otherwise it is refused, naming what is wrong, so a report never mixes two."""
    from .runfolder import RunFolder, config_differences

    folder = spec.folder(out)
    metrics = _table(folder / "metrics.csv")
    mine = metrics[metrics["method"] == spec.method] if "method" in metrics else metrics
    if mine.empty:
        return None
    saved = ExperimentConfig.load(folder / "config.json")
    changed = [d for d in config_differences(saved, spec.cfg) if not d.startswith("data:")]
    data = RunFolder(folder, spec.cfg).data_differences()
    for what, diff in (("another protocol", changed), ("other data", data)):
        if diff:
            raise RunFolderError(f"{folder} holds a finished run of {what} ({'; '.join(diff)}); move it away or "
                                 "delete it to run it again")
    row = mine.iloc[0].to_dict()
    _check_whole(folder, spec, row)
    return row


def _check_whole(folder: Path, spec: RunSpec, row: dict) -> None:
    """A finished run's results reach its last round and its metrics are whole (five finite scores over every MR)."""
    if isinstance(row.get("note"), str):  # no client could train it: a result without rounds
        return
    curve = _table(folder / "results.csv")
    last = curve[curve["method"] == spec.method]["round"].max() if "method" in curve else float("nan")
    problems = [] if last == spec.cfg.rounds else [f"results.csv stops at round {last} of {spec.cfg.rounds}"]
    bad = [k for k in METRICS if not isinstance(row.get(k), (int, float)) or row[k] != row[k]]
    problems += [f"metrics.csv lacks a finite {', '.join(bad)}"] if bad else []
    try:
        outputs = json.loads(row.get("outputs"))
    except (TypeError, ValueError):
        outputs = None
    if not isinstance(outputs, list) or not 0 < len(outputs) <= spec.cfg.eval_mrs:
        problems.append("metrics.csv's outputs do not parse as the run's generated texts")
    if problems:
        raise RunFolderError(f"{folder} is not a whole finished run: {'; '.join(problems)}; delete the folder to run "
                             "it again")


def finished(spec: RunSpec, out) -> bool:
    return _final_metrics(spec, out) is not None


def _elapsed(folder: Path) -> float | None:
    """Wall seconds spent on a run so far, over every invocation (None before the first ends)."""
    path = folder / ELAPSED
    return read_mapping(path).get("seconds") if path.is_file() else None


def run_comparison(ccfg: ComparisonConfig, out, settings=None, methods=None, seeds=None, data=None,
                   progress: bool = True) -> None:
    """Run the selected, unfinished runs of the comparison, each resumable in its own folder (`collect` merges
    them). `data` overrides every run's data folder. The wall seconds spent on each run are added up in its
    folder's elapsed.json, so the comparison's total time survives being run in pieces."""
    from .experiment import run_experiment

    specs = ccfg.with_data(data).runs(settings, methods, seeds)
    todo = [s for s in specs if not finished(s, out)]
    for spec in todo:  # every selected run's budgets and split points against the model, before the first starts
        try:
            spec.cfg.validate()
        except ValueError as exc:
            raise type(exc)(f"comparison run {spec.setting}/{spec.method}/seed{spec.seed}: {exc}") from None
    for spec in tqdm(todo, desc="runs", disable=not progress):
        folder = spec.folder(out)
        before, start = _elapsed(folder) or 0.0, time.perf_counter()

        def record(*_):  # after every round too, so a killed run loses at most its last round's seconds
            if folder.is_dir():
                atomic_write_json(folder / ELAPSED, {"seconds": before + time.perf_counter() - start})
        try:
            run_experiment(spec.cfg, out_dir=folder, progress=False, figures=False, on_round=record)
        finally:
            record()


def _read_run(spec: RunSpec, out) -> tuple[pd.DataFrame, dict] | None:
    m = _final_metrics(spec, out)
    if m is None:
        return None
    folder = spec.folder(out)
    curve = _table(folder / "results.csv")
    keys = {"setting": spec.setting, "method": spec.method, "seed": spec.seed}
    if len(curve):
        curve = curve[curve["method"] == spec.method].drop(columns=[k for k in METRICS if k in curve])
        curve = curve.assign(**keys)[list(keys) + [c for c in curve.columns if c not in keys]]
    return curve, {**keys, "m": m, "elapsed": _elapsed(folder)}


def _run_row(spec: RunSpec, curve: pd.DataFrame, info: dict) -> dict:
    """One tidy row: final and best PPL, parameters, bytes, the five metrics and how many MRs they scored."""
    m, central = info["m"], not METHODS[spec.method].federated
    row = {"setting": spec.setting, "method": spec.method, "seed": spec.seed}
    if not len(curve):  # no client could train this method at these budgets
        return {**row, "note": m.get("note", ""), "eval_mrs": 0}
    last = curve.sort_values("round").iloc[-1]
    clients, server = int(last["trainable_client_params"]), int(last["trainable_server_params"])
    row.update(final_ppl=float(last["val_ppl"]), best_ppl=float(curve["val_ppl"].min()), rounds=int(last["round"]),
               sim_time_total_s=float(last["sim_time_s"]), wall_time_train_s=float(last["wall_time_s"]),
               wall_time_run_s=info["elapsed"], bytes_total=float(curve["bytes_up"].sum() + curve["bytes_down"].sum()),
               trainable_client_params=clients, trainable_server_params=server,
               # what one device trains: a central method's whole set, had a device run it
               trainable_per_client=(clients + server) if central else clients / spec.cfg.num_clients)
    row.update({k: m.get(k, float("nan")) for k in METRICS})
    row["eval_mrs"] = len(json.loads(m["outputs"])) if isinstance(m.get("outputs"), str) else 0
    return row


def collect(ccfg: ComparisonConfig, out) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Every finished run of the comparison merged: (curves, runs, targets). `runs` has one row per
    (setting, method, seed) with its time to each target of its setting (NaN: not reached)."""
    curves, rows = [], []
    for spec in ccfg.runs():
        got = _read_run(spec, out)
        if got is None:
            continue
        curve, info = got
        if len(curve):  # a run no client could train has no curve
            curves.append(curve)
        rows.append(_run_row(spec, curve, info))
    curves = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["setting", "method", "seed"])
    runs = pd.DataFrame(rows)
    if runs.empty:
        return curves, runs, pd.DataFrame()
    goal = targets(curves, ccfg.core)
    return curves, add_times_to_targets(runs, curves, goal) if len(goal) else runs, goal


def write_report(ccfg: ComparisonConfig, out, dest) -> dict[str, pd.DataFrame]:
    """Collect the finished runs and write the tidy tables and the figures with spreads to `dest`:
    comparison.csv (one row per setting, method and seed), comparison_summary.csv (mean and standard deviation
    over seeds), comparison_claims.csv (each of the paper's claims per setting), comparison_targets.csv,
    comparison_curves.csv (every evaluation of every run), and
    per setting comparison_<setting>_rounds.png / _time.png, plus comparison_final_ppl.png and
    comparison_time_to_t50.png."""
    import matplotlib.pyplot as plt

    from .io import atomic_write_text
    from .plots import plot_curves_with_spread, plot_summary_bars, save_figure
    from .reporting import claims, claims_markdown, heterogeneity_cost, summarize_runs, summary_markdown

    dest = Path(dest)
    curves, runs, goal = collect(ccfg, out)
    if runs.empty:
        return {"comparison": runs}
    summary = summarize_runs(runs)
    tables = {"comparison": runs, "comparison_summary": summary, "comparison_claims": claims(summary),
              "comparison_targets": goal, "comparison_curves": curves}
    homogeneous = [name for name in ccfg.settings if ccfg.homogeneous(name) and name in set(runs["setting"])]
    if homogeneous:
        tables["comparison_heterogeneity"] = heterogeneity_cost(runs, homogeneous[0])
    for name, df in tables.items():
        atomic_write_text(dest / f"{name}.csv", df.to_csv(index=False))
    atomic_write_text(dest / "comparison_claims.md", claims_markdown(tables["comparison_claims"]) + "\n")
    atomic_write_text(dest / "comparison_summary.md", "\n\n".join(
        f"### {setting}\n\n{summary_markdown(summary, setting)}" for setting in summary["setting"].unique()) + "\n")
    for setting in curves["setting"].unique():  # a setting where nothing trained has no curves to draw
        for x, tag in (("round", "rounds"), ("sim_time_s", "time")):
            fig = plot_curves_with_spread(curves, setting, x)
            save_figure(fig, dest, f"comparison_{setting}_{tag}")
            plt.close(fig)
    for column, label, tag in (("final_ppl", "final validation PPL", "final_ppl"),
                               ("time_to_t50_s", "simulated s to the 50% target", "time_to_t50")):
        if f"{column}_mean" in summary:
            fig = plot_summary_bars(summary, column, label)
            save_figure(fig, dest, f"comparison_{tag}")
            plt.close(fig)
    return tables


REPORT_TABLES = ("comparison", "comparison_summary", "comparison_claims", "comparison_targets", "comparison_curves",
                 "comparison_heterogeneity")


def read_report(dest) -> dict[str, pd.DataFrame]:
    """The tables `write_report` wrote to `dest` (an empty dict when there are none), e.g. bench/results."""
    dest = Path(dest)
    return {name: read_whole_csv(dest / f"{name}.csv") for name in REPORT_TABLES if (dest / f"{name}.csv").is_file()}
