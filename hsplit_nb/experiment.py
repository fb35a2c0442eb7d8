"""Experiments: a JSON/YAML config, every method on the same engine and data, checkpoints and resume.

`run_experiment(config, methods)` returns one row per method and round (round 0 is the model before
training). After every round a method's state is checkpointed atomically; a run that stops is
started again with the same config and output folder and resumes where it stopped, with the same
numbers as an uninterrupted run.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .config import ExperimentConfig
from .costs import ClientSpec
from .clientdata import Splits, client_partitions, load_splits
from .data import E2EDataset, loader
from .federation import Client, NoClientFits, federation, in_process
from .federation.divergence import finite
from .io import FolderLock, atomic_write_bytes, atomic_write_text, torch_bytes
from .methods import get_method
from .metrics import e2e_metrics, generate
from .models import load_model
from .plots import save_figures
from .runfolder import RunFolder, RunFolderError

# ---- running --------------------------------------------------------------------------------------

def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class _Run:
    """One method within one experiment: build, resume, run rounds, evaluate."""

    def __init__(self, cfg: ExperimentConfig, name: str, splits: Splits, out: Path | None, transport=in_process,
                 on_lost=None):
        self.cfg, self.name, self.splits, self.out = cfg, name, splits, out
        self.method = get_method(name)
        self.model, self.tok = load_model(cfg.model, device=cfg.device)
        sim = cfg.resolved(self.model.config)  # a testbed's speeds made explicit
        _seed_everything(cfg.seed)
        self.events = cfg.events_in_bytes(self.model.config)
        parts = client_partitions(cfg, splits)
        speeds = sim.speeds or [None] * cfg.num_clients
        clients = [Client(n, ClientSpec(n, b, speeds[k], sim.bandwidth), parts[k])
                   for k, (n, b) in enumerate(zip(cfg.client_names(), cfg.budget_bytes(self.model.config)))]
        train = E2EDataset(splits.train, self.tok, cfg.seq_len)
        self.val_batches = list(loader(E2EDataset(splits.val, self.tok, cfg.seq_len), self.tok, cfg.batch_size))
        self.fed = federation(self.model, self.tok, self.method, clients, train, sim, cfg.device, transport, on_lost)

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

    def _reconfigurations(self, table: list[dict]) -> None:
        """This method's reconfigurations so far (they live in the server's state, so a resume keeps them)."""
        table[:] = [x for x in table if x["method"] != self.name] + \
            [{"method": self.name, **x} for x in getattr(self.fed, "reconfigurations", [])]

    def run(self, rows: list[dict], client_rows: list[dict], on_round, reconfigurations: list | None = None) -> None:
        reconfigurations = [] if reconfigurations is None else reconfigurations
        start = 1
        ckpt = self.checkpoint
        if ckpt is not None and ckpt.is_file():
            saved = _read_checkpoint(ckpt, self.name, _setting(self.cfg))
            self.fed.load_state(saved["state"])
            rows += saved["rows"]
            client_rows += saved["client_rows"]
            start = saved["round"] + 1
        else:
            self.fed.start()
            rows.append(self._row(0, None, {}, {}))
        self._reconfigurations(reconfigurations)
        for r in range(start, self.cfg.rounds + 1):
            info = self.fed.begin_round(r, self.events) if self.method.federated else {}
            rec = self.fed.run_round(r, info.get("weights_down", {}))
            if rec.get("reasons"):  # what happened during the round (a client lost mid-round)
                info = {**info, "reasons": list(info.get("reasons", [])) + rec["reasons"]}
            row = self._row(r, rec["train_loss"], rec["bytes"], info)
            finite(self.fed, row["val_ppl"], "the validation perplexity", step=0)  # before it becomes a checkpoint
            rows.append(row)
            self._reconfigurations(reconfigurations)
            client_rows += [{"method": self.name, "round": r, "client": c.name, "present": c.present,
                             "split_point": c.split_point, "total_rank": sum(c.ranks.values()), **rec["bytes"][c.name]}
                            for c in self.fed.clients]
            if ckpt is not None:
                mine = [x for x in rows if x["method"] == self.name]
                mine_c = [x for x in client_rows if x["method"] == self.name]
                buf = torch_bytes({"round": r, "state": self.fed.state(), "rows": mine, "client_rows": mine_c,
                                   "method": self.name, "fingerprint": _setting(self.cfg),
                                   "format": CHECKPOINT_FORMAT})
                atomic_write_bytes(ckpt, buf)
            on_round(self.name, row)

    def final_metrics(self) -> dict:
        test = self.splits.test
        with self.fed.global_model() as model:
            outputs = generate(model, self.tok, list(test["mr"]), self.cfg.max_new_tokens, self.cfg.num_beams,
                               self.cfg.eval_batch_size or self.cfg.batch_size, self.cfg.device)
        return {"method": self.name, **e2e_metrics(outputs, list(test["refs"])),
                "outputs": json.dumps(outputs)}


CHECKPOINT_FORMAT = 2  # 2: the main server's state is its parts' states (issue 22); 1: before


def _setting(cfg: ExperimentConfig) -> str:
    """The fingerprint a checkpoint records: the config's, where the data files lie left out (the run folder checks
    their contents before any checkpoint is read, and the same files under another path resume)."""
    return cfg.replace(data="builtin").fingerprint()


def _read_checkpoint(path: Path, method: str, fingerprint: str) -> dict:
    """A checkpoint of this method and setting, in the state format this engine writes."""
    try:
        saved = torch.load(path, weights_only=False)
        if not {"round", "state", "rows", "client_rows"} <= set(saved):
            raise KeyError("round, state, rows, client_rows")
    except Exception as exc:  # torch.load raises many kinds on a truncated or foreign file
        raise RunFolderError(f"checkpoint {path} cannot be read ({exc.__class__.__name__}: {str(exc)[:120]}); "
                             f"delete it to start {method} again from round 0") from None
    if saved.get("format", 1) != CHECKPOINT_FORMAT:
        raise RunFolderError(f"checkpoint {path} holds state format {saved.get('format', 1)}, written by an older "
                             f"engine; this one reads format {CHECKPOINT_FORMAT} (the server's parts' states, "
                             f"2026-12-06). Finish the run with the commit that started it, or delete the checkpoint "
                             f"to start {method} again from round 0")
    for key, want in (("method", method), ("fingerprint", fingerprint)):
        if saved.get(key, want) != want:
            raise RunFolderError(f"checkpoint {path} belongs to {key} {saved[key]!r}, not {want!r}; move it away or "
                                 f"delete it to start {method} again from round 0")
    return saved


def run_experiment(config: ExperimentConfig, methods=None, out_dir=None, progress: bool = True,
                   on_round=None, transport=in_process, on_lost=None, figures: bool = True) -> pd.DataFrame:
    """Run `methods` (default: the config's) and return one row per method and round.

    With `out_dir`, results.csv, clients.csv, metrics.csv, config.json, fingerprint.json and figures are written
    (atomically), and a stopped run resumes from its checkpoints when started again with the same config and
    data. A method that diverges stops the run with `Diverged`: no NaN is checkpointed, scored or drawn.
    `transport` gives the main server its client proxies (in-process by default; the multi-process runner
    passes remote clients), and `on_lost(method, client, reason)` hears of clients lost mid-run. `figures=False`
    writes the tables only (a comparison draws its own figures over many folders).
    """
    cfg = config.replace(methods=list(methods)) if methods is not None else config
    cfg.validate()
    if out_dir is None:
        return _run_methods(cfg, None, progress, on_round, transport, on_lost, figures)
    folder = RunFolder(out_dir, cfg)
    with FolderLock(out_dir):
        folder.check()
        return _run_methods(cfg, folder, progress, on_round, transport, on_lost, figures)


def _run_methods(cfg: ExperimentConfig, folder: RunFolder | None, progress, on_round, transport, on_lost,
                 figures) -> pd.DataFrame:
    """run_experiment's loop over the methods not yet finished (the folder locked by the caller)."""
    rows, client_rows, metrics, reconfs = folder.read() if folder is not None else ([], [], [], [])
    done = {m["method"] for m in metrics if cfg.final_metrics or isinstance(m.get("note"), str)} | \
        ({r["method"] for r in rows if r["round"] == cfg.rounds} if not cfg.final_metrics else set())
    rows = [r for r in rows if r["method"] in done]
    client_rows = [r for r in client_rows if r["method"] in done]
    reconfs = [r for r in reconfs if r["method"] in done]
    splits = load_splits(cfg)
    todo = [m for m in cfg.methods if m not in done]
    bar = tqdm(total=len(todo) * cfg.rounds, desc="rounds", disable=not progress)

    def write(*tables):
        if folder is not None:
            folder.write(*tables, reconfs)

    def round_done(method, row):
        bar.update(1)
        bar.set_postfix(method=method, ppl=f"{row['val_ppl']:.3f}")
        write(rows, client_rows, metrics)
        if on_round is not None:
            on_round(method, row)

    for name in todo:
        run = _Run(cfg, name, splits, folder.path if folder is not None else None, transport,
                   None if on_lost is None else (lambda client, why, name=name: on_lost(name, client, why)))
        if folder is not None and not folder.recorded:
            folder.record()  # training starts: from here on the folder holds this setting
        try:
            run.run(rows, client_rows, round_done, reconfs)
        except NoClientFits as exc:  # a result, not a failure: this method cannot train at these budgets
            metrics.append({"method": name, "note": str(exc)})
            bar.update(cfg.rounds)
            write(rows, client_rows, metrics)
            continue
        if cfg.final_metrics:
            metrics.append(run.final_metrics())
        write(rows, client_rows, metrics)
        if run.checkpoint is not None and run.checkpoint.is_file():
            run.checkpoint.unlink()
        del run
    bar.close()
    return _finish(folder, rows, client_rows, metrics, figures, reconfs)


def rescore(out_dir) -> pd.DataFrame:
    """Score a folder's finished methods again from their stored outputs (after a metrics change, so that one
    folder never mixes two scorers), then rewrite its tables and figures. Trains nothing."""
    out = Path(out_dir)
    cfg = ExperimentConfig.load(out / "config.json")
    metrics = RunFolder(out, cfg).read()[2]
    refs = list(load_splits(cfg).test["refs"])
    for m in metrics:
        if isinstance(m.get("outputs"), str):
            m.update(e2e_metrics(json.loads(m["outputs"]), refs))
    done = [m["method"] for m in metrics]
    atomic_write_text(out / "metrics.csv", pd.DataFrame(metrics).to_csv(index=False))
    return run_experiment(cfg, methods=done, out_dir=out, progress=False)


def _finish(folder: RunFolder | None, rows, client_rows, metrics, figures: bool = True, reconfs=()) -> pd.DataFrame:
    """The results table with the final evaluation joined to each method's last round; figures when saved."""
    df = pd.DataFrame(rows)
    if metrics and not df.empty:
        scores = pd.DataFrame(metrics).drop(columns=["outputs", "note"], errors="ignore")
        last = df.groupby("method")["round"].transform("max") == df["round"]
        df = df.drop(columns=[c for c in scores.columns if c != "method" and c in df.columns])
        df = df.merge(scores, on="method", how="left")
        df.loc[~last.values, [c for c in scores.columns if c != "method"]] = float("nan")
        if folder is not None:
            folder.write(df.to_dict("records"), client_rows, metrics, reconfs)
    if folder is not None and not df.empty and figures:
        save_figures(df, folder.path)
    df.attrs["metrics"] = pd.DataFrame(metrics)
    df.attrs["clients"] = pd.DataFrame(client_rows)
    df.attrs["reconfigurations"] = pd.DataFrame(list(reconfs))
    return df


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
