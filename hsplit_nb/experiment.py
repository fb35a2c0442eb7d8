"""Experiments: a JSON/YAML config, every method on the same engine and data, checkpoints and resume.

`run_experiment(config, methods)` returns one row per method and round (round 0 is the model before
training). After every round a method's state is checkpointed atomically; a run that stops is
started again with the same config and output folder and resumes where it stopped, with the same
numbers as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from .data import (
    E2E_ATTRIBUTES, E2EDataset, group_references, load_builtin, load_e2e, loader, partition,
)
from .federation import Client, FedSettings, Federation, NoClientFits
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .methods import ABLATIONS, METHODS, PAPER_METHODS, get_method
from .metrics import e2e_metrics, generate
from .models import load_model
from .planner import DEFAULT_BANDWIDTH, ClientSpec, weight_bytes

# the paper's 5-20 GB budgets as fractions of LLaMA-2-7B's fp16 weight bytes (13.48 GB), evenly spaced
PAPER_BUDGET_FRACTIONS = [round(gb / 13.48, 4) for gb in (5.0, 8.75, 12.5, 16.25, 20.0)]


@dataclass
class ExperimentConfig:
    """Everything an experiment needs; round-trips through JSON and YAML."""
    model: str = "smollm2-135m"
    data: str = "builtin"  # "builtin", or a folder with E2E's devset.csv and testset_w_refs.csv
    num_clients: int = 5
    budgets: list = field(default_factory=lambda: list(PAPER_BUDGET_FRACTIONS))
    budget_unit: str = "weights"  # "weights": fractions of the model's weight bytes; "bytes"
    speeds: list | None = None  # FLOP/s per client; default proportional to budget
    bandwidth: float = DEFAULT_BANDWIDTH
    server_speed: float | None = None
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    partition_attribute: str = "eatType"
    rounds: int = 5
    local_steps: int = 5
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 1e-3
    ft_lr: float = 5e-5
    rank_levels: list = field(default_factory=lambda: [0, 2, 4, 8, 16])
    headroom: float = 0.1
    split_points: list | None = None  # fixed split point per client for ARMSC methods (null: ARMSC chooses)
    iwi_interval: int = 5
    beta_max: float = 0.9
    delta: float = 0.1
    seed: int = 0
    val_fraction: float = 0.1  # E2E folder: share of the development MRs held out for validation PPL
    val_examples: int = 128
    eval_mrs: int = 20
    num_beams: int = 4
    max_new_tokens: int = 60
    final_metrics: bool = True
    events: list = field(default_factory=list)
    methods: list = field(default_factory=lambda: PAPER_METHODS + ABLATIONS)
    device: str = "cpu"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def fingerprint(self) -> str:
        """A short hash of everything but the method list: one output folder per distinct setting."""
        import hashlib

        d = {k: v for k, v in self.to_dict().items() if k != "methods"}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]

    def save(self, path) -> Path:
        path = Path(path)
        text = yaml.safe_dump(self.to_dict(), sort_keys=False) if path.suffix in (".yaml", ".yml") \
            else json.dumps(self.to_dict(), indent=2) + "\n"
        return atomic_write_text(path, text)

    @classmethod
    def load(cls, path) -> "ExperimentConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
        return cls.from_dict(data)

    def client_names(self) -> list[str]:
        return [f"c{k}" for k in range(self.num_clients)]

    def validate(self) -> None:
        """Fail before any training, naming the field."""
        def bad(field_name, value, allowed):
            raise ValueError(f"config field {field_name!r}: {value!r} is not allowed; {allowed}")

        for name in self.methods:
            if name not in METHODS:
                bad("methods", name, f"choose from {', '.join(METHODS)}")
        if not self.methods:
            bad("methods", self.methods, "name at least one method")
        for f in ("num_clients", "rounds", "local_steps", "batch_size", "seq_len", "iwi_interval", "val_examples",
                  "eval_mrs", "num_beams", "max_new_tokens"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(f, v, "a positive integer")
        if len(self.budgets) != self.num_clients:
            bad("budgets", self.budgets, f"one budget per client ({self.num_clients})")
        for b in self.budgets:
            if not isinstance(b, (int, float)) or not b > 0 or not math.isfinite(b):
                bad("budgets", b, "budgets must be positive numbers")
        if self.budget_unit not in ("weights", "bytes"):
            bad("budget_unit", self.budget_unit, "'weights' (fractions of the model's weight bytes) or 'bytes'")
        if self.speeds is not None and (len(self.speeds) != self.num_clients or min(self.speeds) <= 0):
            bad("speeds", self.speeds, f"{self.num_clients} positive FLOP/s values, or null")
        for f in ("bandwidth", "lr", "ft_lr", "delta"):
            if not getattr(self, f) > 0:
                bad(f, getattr(self, f), "a positive number")
        if self.server_speed is not None and not self.server_speed > 0:
            bad("server_speed", self.server_speed, "a positive number or null")
        if self.partition not in ("iid", "dirichlet"):
            bad("partition", self.partition, "'iid' or 'dirichlet'")
        if self.partition_attribute not in E2E_ATTRIBUTES:
            bad("partition_attribute", self.partition_attribute, f"one of {E2E_ATTRIBUTES}")
        if not 0 <= self.headroom < 1:
            bad("headroom", self.headroom, "a number in [0, 1)")
        if not 0 <= self.beta_max < 1:
            bad("beta_max", self.beta_max, "a number in [0, 1)")
        if not 0 < self.val_fraction < 1:
            bad("val_fraction", self.val_fraction, "a number in (0, 1)")
        if 0 not in self.rank_levels or any((not isinstance(r, int)) or r < 0 for r in self.rank_levels) \
                or len(set(self.rank_levels)) < 2:
            bad("rank_levels", self.rank_levels, "non-negative integers including 0 and at least one positive rank")
        if self.data != "builtin":
            d = Path(self.data)
            if not d.is_dir():
                bad("data", self.data, "'builtin' or an existing folder with devset.csv and testset_w_refs.csv")
            for f in ("devset.csv", "testset_w_refs.csv"):
                if not (d / f).is_file():
                    bad("data", self.data, f"the folder lacks {f}")
        if self.split_points is not None:
            from .models import model_config
            from .split import num_blocks

            n_blocks = num_blocks(model_config(self.model))
            if len(self.split_points) != self.num_clients:
                bad("split_points", self.split_points, f"one split point per client ({self.num_clients}), or null")
            for s in self.split_points:
                if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= n_blocks - 1:
                    bad("split_points", s, f"split points must be integers in [1, {n_blocks - 1}] for "
                                           f"{self.model!r} ({n_blocks} blocks)")
        names = self.client_names()
        for i, e in enumerate(self.events):
            where = f"events[{i}]"
            if not isinstance(e, dict) or e.get("type") not in ("dropout", "budget"):
                bad(where, e, "a mapping with type 'dropout' or 'budget'")
            client = e.get("client")
            if client not in names and not (isinstance(client, int) and 0 <= client < self.num_clients):
                bad(f"{where}.client", client, f"one of {names} or an index below {self.num_clients}")
            if e["type"] == "dropout":
                if not (isinstance(e.get("start"), int) and isinstance(e.get("end"), int)
                        and 1 <= e["start"] <= e["end"]):
                    bad(where, e, "dropout needs integer rounds 1 <= start <= end")
            else:
                if not (isinstance(e.get("round"), int) and e["round"] >= 1):
                    bad(f"{where}.round", e.get("round"), "an integer round >= 1")
                if not (isinstance(e.get("memory"), (int, float)) and e["memory"] > 0):
                    bad(f"{where}.memory", e.get("memory"), "a positive budget in the config's budget_unit")


# ---- data -------------------------------------------------------------------------------------

@dataclass
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame  # grouped: mr, refs


def load_splits(cfg: ExperimentConfig) -> Splits:
    """Training pool, validation rows and test MRs with grouped references."""
    rng = np.random.default_rng(cfg.seed)
    if cfg.data == "builtin":
        train, val, test = load_builtin("train"), load_builtin("dev"), group_references(load_builtin("test"))
    else:
        d = Path(cfg.data)
        dev = load_e2e(d / "devset.csv")
        mrs = dev["mr"].unique()
        held = set(rng.choice(mrs, size=max(1, round(cfg.val_fraction * len(mrs))), replace=False))
        train, val = dev[~dev["mr"].isin(held)], dev[dev["mr"].isin(held)]
        test = group_references(load_e2e(d / "testset_w_refs.csv"))
    val = val.sample(n=min(cfg.val_examples, len(val)), random_state=cfg.seed).sort_index()
    test = test.sample(n=min(cfg.eval_mrs, len(test)), random_state=cfg.seed).sort_index()
    return Splits(train.reset_index(drop=True), val.reset_index(drop=True), test.reset_index(drop=True))


# ---- running --------------------------------------------------------------------------------------

def _events(cfg: ExperimentConfig, scale: float) -> list[dict]:
    names = cfg.client_names()
    out = []
    for e in cfg.events:
        e = dict(e)
        if isinstance(e["client"], int):
            e["client"] = names[e["client"]]
        if e["type"] == "budget":
            e["memory"] = e["memory"] * scale
        out.append(e)
    return out


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class _Run:
    """One method within one experiment: build, resume, run rounds, evaluate."""

    def __init__(self, cfg: ExperimentConfig, name: str, splits: Splits, out: Path | None, federation=Federation):
        self.cfg, self.name, self.splits, self.out = cfg, name, splits, out
        self.method = get_method(name)
        self.model, self.tok = load_model(cfg.model, device=cfg.device)
        _seed_everything(cfg.seed)
        self.scale = weight_bytes(self.model.config) if cfg.budget_unit == "weights" else 1.0
        self.events = _events(cfg, self.scale)
        parts = partition(list(splits.train["mr"]), cfg.num_clients, cfg.partition, cfg.seed, cfg.dirichlet_alpha,
                          cfg.partition_attribute)
        clients = [Client(n, ClientSpec(n, b * self.scale, None if cfg.speeds is None else cfg.speeds[k],
                                        cfg.bandwidth), parts[k])
                   for k, (n, b) in enumerate(zip(cfg.client_names(), cfg.budgets))]
        settings = FedSettings(cfg.local_steps, cfg.batch_size, cfg.seq_len, cfg.lr, cfg.ft_lr,
                               tuple(cfg.rank_levels), cfg.headroom, cfg.iwi_interval, cfg.beta_max, cfg.delta,
                               cfg.server_speed, seed=cfg.seed, split_points=cfg.split_points)
        train = E2EDataset(splits.train, self.tok, cfg.seq_len)
        self.val_batches = list(loader(E2EDataset(splits.val, self.tok, cfg.seq_len), self.tok, cfg.batch_size))
        self.fed = federation(self.model, self.tok, self.method, clients, train, settings, cfg.device)

    @property
    def checkpoint(self) -> Path | None:
        return None if self.out is None else self.out / "checkpoints" / f"{self.name}.pt"

    def _row(self, r: int, train_loss: float | None, bytes_: dict, info: dict) -> dict:
        fed = self.fed
        up = sum(v for b in bytes_.values() for k, v in b.items() if k.endswith("_up"))
        down = sum(v for b in bytes_.values() for k, v in b.items() if k.endswith("_down"))
        on_clients, on_server = fed.trainable_params()
        row = {"method": self.name, "round": r, "val_ppl": fed.evaluate_ppl(self.val_batches),
               "train_loss": train_loss, "sim_time_s": fed.sim_time, "wall_time_s": fed.wall_time,
               "bytes_up": up, "bytes_down": down, "trainable_client_params": on_clients,
               "trainable_server_params": on_server, "present": len(fed.present),
               "reconfigured": bool(info.get("reconfigured")), "reasons": "; ".join(info.get("reasons", []))}
        for c in fed.clients:
            row[f"split_{c.name}"] = c.split_point
            row[f"rank_{c.name}"] = sum(c.ranks.values())
        return row

    def run(self, rows: list[dict], client_rows: list[dict], on_round) -> None:
        start = 1
        ckpt = self.checkpoint
        if ckpt is not None and ckpt.is_file():
            saved = torch.load(ckpt, weights_only=False)
            self.fed.load_state(saved["state"])
            rows += saved["rows"]
            client_rows += saved["client_rows"]
            start = saved["round"] + 1
        else:
            self.fed.start()
            rows.append(self._row(0, None, {}, {}))
        for r in range(start, self.cfg.rounds + 1):
            info = self.fed.begin_round(r, self.events) if self.method.federated else {}
            rec = self.fed.run_round(r, info.get("weights_down", {}))
            if rec.get("reasons"):  # what happened during the round (a client lost mid-round)
                info = {**info, "reasons": list(info.get("reasons", [])) + rec["reasons"]}
            row = self._row(r, rec["train_loss"], rec["bytes"], info)
            rows.append(row)
            client_rows += [{"method": self.name, "round": r, "client": c.name, "present": c.present,
                             "split_point": c.split_point, "total_rank": sum(c.ranks.values()), **rec["bytes"][c.name]}
                            for c in self.fed.clients]
            if ckpt is not None:
                mine = [x for x in rows if x["method"] == self.name]
                mine_c = [x for x in client_rows if x["method"] == self.name]
                buf = _to_bytes({"round": r, "state": self.fed.state(), "rows": mine, "client_rows": mine_c})
                atomic_write_bytes(ckpt, buf)
            on_round(self.name, row)

    def final_metrics(self) -> dict:
        test = self.splits.test
        with self.fed.global_model() as model:
            outputs = generate(model, self.tok, list(test["mr"]), self.cfg.max_new_tokens, self.cfg.num_beams,
                               self.cfg.batch_size, self.cfg.device)
        return {"method": self.name, **e2e_metrics(outputs, list(test["refs"])),
                "outputs": json.dumps(outputs)}


def _to_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def run_experiment(config: ExperimentConfig, methods=None, out_dir=None, progress: bool = True,
                   on_round=None, federation=Federation) -> pd.DataFrame:
    """Run `methods` (default: the config's) and return one row per method and round.

    With `out_dir`, results.csv, clients.csv, metrics.csv, config.json and figures are written after
    every round (atomically), and a stopped run resumes from its checkpoints when started again.
    `federation` builds each method's federation (the distributed server passes its own).
    """
    cfg = dataclasses.replace(config, methods=list(methods)) if methods is not None else config
    cfg.validate()
    out = Path(out_dir) if out_dir is not None else None
    rows: list[dict] = []
    client_rows: list[dict] = []
    metrics: list[dict] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        saved_cfg = out / "config.json"
        if saved_cfg.is_file():
            previous = ExperimentConfig.from_dict(json.loads(saved_cfg.read_text()))
            if dataclasses.replace(previous, methods=cfg.methods) != cfg:
                raise ValueError(f"{out} holds results of a different config; choose another output folder")
            methods_before = previous.methods
        else:
            methods_before = []
        cfg_to_save = dataclasses.replace(cfg, methods=list(dict.fromkeys(methods_before + cfg.methods)))
        atomic_write_json(saved_cfg, cfg_to_save.to_dict())
        rows, client_rows, metrics = _load_finished(out)
    done = {m["method"] for m in metrics if cfg.final_metrics or isinstance(m.get("note"), str)} | \
        ({r["method"] for r in rows if r["round"] == cfg.rounds} if not cfg.final_metrics else set())
    rows = [r for r in rows if r["method"] in done]
    client_rows = [r for r in client_rows if r["method"] in done]
    splits = load_splits(cfg)
    todo = [m for m in cfg.methods if m not in done]
    bar = tqdm(total=len(todo) * cfg.rounds, desc="rounds", disable=not progress)

    def round_done(method, row):
        bar.update(1)
        bar.set_postfix(method=method, ppl=f"{row['val_ppl']:.3f}")
        _write(out, rows, client_rows, metrics)
        if on_round is not None:
            on_round(method, row)

    for name in todo:
        run = _Run(cfg, name, splits, out, federation)
        try:
            run.run(rows, client_rows, round_done)
        except NoClientFits as exc:  # a result, not a failure: this method cannot train at these budgets
            metrics.append({"method": name, "note": str(exc)})
            bar.update(cfg.rounds)
            _write(out, rows, client_rows, metrics)
            continue
        if cfg.final_metrics:
            metrics.append(run.final_metrics())
        _write(out, rows, client_rows, metrics)
        if run.checkpoint is not None and run.checkpoint.is_file():
            run.checkpoint.unlink()
        del run
    bar.close()
    df = pd.DataFrame(rows)
    if metrics and not df.empty:  # the final evaluation joins each method's last round
        scores = pd.DataFrame(metrics).drop(columns=["outputs", "note"], errors="ignore")
        last = df.groupby("method")["round"].transform("max") == df["round"]
        df = df.drop(columns=[c for c in scores.columns if c != "method" and c in df.columns])
        df = df.merge(scores, on="method", how="left")
        df.loc[~last.values, [c for c in scores.columns if c != "method"]] = float("nan")
        _write(out, df.to_dict("records"), client_rows, metrics)
    if out is not None and not df.empty:
        from .plots import save_figures

        save_figures(df, out)
    df.attrs["metrics"] = pd.DataFrame(metrics)
    df.attrs["clients"] = pd.DataFrame(client_rows)
    return df


def _load_finished(out: Path):
    def read(name):
        try:
            df = pd.read_csv(out / name)
        except (FileNotFoundError, pd.errors.EmptyDataError):
            return []
        if "reasons" in df:  # an empty string reads back as NaN
            df["reasons"] = df["reasons"].fillna("")
        return df.to_dict("records")
    return read("results.csv"), read("clients.csv"), read("metrics.csv")


def _write(out: Path | None, rows, client_rows, metrics) -> None:
    if out is None:
        return
    atomic_write_text(out / "results.csv", pd.DataFrame(rows).to_csv(index=False))
    atomic_write_text(out / "clients.csv", pd.DataFrame(client_rows).to_csv(index=False))
    atomic_write_text(out / "metrics.csv", pd.DataFrame(metrics).to_csv(index=False))


def _time_to(part: pd.DataFrame, target: float, column: str) -> float:
    """First `column` value at which val_ppl reaches `target`, linearly interpolated between rounds."""
    part = part.sort_values("round")
    prev = None
    for _, row in part.iterrows():
        if row["val_ppl"] <= target:
            if prev is None or prev["val_ppl"] == row["val_ppl"]:
                return float(row[column])
            frac = (prev["val_ppl"] - target) / (prev["val_ppl"] - row["val_ppl"])
            return float(prev[column] + frac * (row[column] - prev[column]))
        prev = row
    return float("nan")


def summarize(df: pd.DataFrame, metrics: pd.DataFrame | None = None, target: float | None = None,
              reference: str = "hsplitlora") -> pd.DataFrame:
    """Per method: final and best PPL, rounds and simulated/wall time to a common target PPL (default: the
    highest best-PPL of all methods, so every method reaches it), the ratio of that time to the reference
    method's, total bytes, trainable parameters, and the E2E metrics when given."""
    best = df.groupby("method", sort=False)["val_ppl"].min()
    target = float(best.max()) if target is None else target
    rows = []
    for name, part in df.groupby("method", sort=False):
        last = part.sort_values("round").iloc[-1]
        rows.append({"method": name, "final_ppl": last["val_ppl"], "best_ppl": best[name], "target_ppl": target,
                     "rounds_to_target": _time_to(part, target, "round"),
                     "sim_time_to_target_s": _time_to(part, target, "sim_time_s"),
                     "wall_time_to_target_s": _time_to(part, target, "wall_time_s"),
                     "sim_time_total_s": last["sim_time_s"], "wall_time_total_s": last["wall_time_s"],
                     "bytes_total": part["bytes_up"].sum() + part["bytes_down"].sum(),
                     "trainable_client_params": last["trainable_client_params"],
                     "trainable_server_params": last["trainable_server_params"]})
    out = pd.DataFrame(rows)
    if reference in set(out["method"]):
        ref = out.set_index("method").loc[reference, "sim_time_to_target_s"]
        out[f"time_ratio_vs_{reference}"] = out["sim_time_to_target_s"] / ref
    if metrics is not None and not metrics.empty:
        out = out.merge(metrics.drop(columns=["outputs"], errors="ignore"), on="method", how="outer", sort=False)
    return out
