"""One settings source: the experiment config, its defaults beside it, its validation and its units.

Everything a run needs, the federation's settings included (HetLoRA's gamma too), round-trips through
JSON and YAML. Budgets are converted to bytes once (`budget_bytes`); the presets in configs/ are files of
this config that notebooks, tests and benchmarks load with overrides (`preset`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .costs import DEFAULT_BANDWIDTH, weight_bytes
from .data import E2E_ATTRIBUTES
from .io import atomic_write_text
from .methods import ABLATIONS, METHODS, PAPER_METHODS
from .planner import DEFAULT_RANK_LEVELS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# the paper's 5-20 GB budgets as fractions of LLaMA-2-7B's fp16 weight bytes (13.48 GB), evenly spaced
PAPER_BUDGET_FRACTIONS = [round(gb / 13.48, 4) for gb in (5.0, 8.75, 12.5, 16.25, 20.0)]
_POSITIVE_INTS = ("num_clients", "rounds", "local_steps", "batch_size", "seq_len", "iwi_interval", "val_examples",
                  "eval_mrs", "num_beams", "max_new_tokens")


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
    rank_levels: list = field(default_factory=lambda: list(DEFAULT_RANK_LEVELS))
    server_adapter_budget: float | None = None  # bytes for the main server's shared adapters (null: top rank)
    lora_alpha: float | None = None  # scale = alpha / r, alpha fixed across ranks (null: 2 x the top rank level)
    headroom: float = 0.1
    split_points: list | None = None  # fixed split point per client for ARMSC methods (null: ARMSC chooses)
    iwi_interval: int = 5
    beta_max: float = 0.9
    delta: float = 0.1
    gamma: float = 0.9  # HetLoRA's regulariser keeps the first ceil(gamma r) rank components free
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

    # ---- files and copies ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def replace(self, **overrides) -> "ExperimentConfig":
        """A copy with some fields changed (unknown fields are an error)."""
        return self.from_dict({**self.to_dict(), **overrides})

    def fingerprint(self) -> str:
        """A short hash of everything but the method list: one output folder per distinct setting."""
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

    # ---- derived values --------------------------------------------------------------------------

    def client_names(self) -> list[str]:
        return [f"c{k}" for k in range(self.num_clients)]

    @property
    def top_rank(self) -> int:
        return max(self.rank_levels)

    @property
    def alpha(self) -> float:
        """LoRA's alpha, the same at every rank: as configured, else 2 x the top rank level."""
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.top_rank

    def budget_scale(self, model_config) -> float:
        """Bytes per budget unit: the model's weight bytes for "weights", 1 for "bytes"."""
        return weight_bytes(model_config) if self.budget_unit == "weights" else 1.0

    def budget_bytes(self, model_config) -> list[float]:
        """Every client's memory budget in bytes."""
        scale = self.budget_scale(model_config)
        return [b * scale for b in self.budgets]

    def events_in_bytes(self, model_config) -> list[dict]:
        """The event schedule with client names and budget events' memory in bytes."""
        names, scale, out = self.client_names(), self.budget_scale(model_config), []
        for e in self.events:
            e = dict(e)
            if isinstance(e["client"], int):
                e["client"] = names[e["client"]]
            if e["type"] == "budget":
                e["memory"] = e["memory"] * scale
            out.append(e)
        return out

    # ---- validation ------------------------------------------------------------------------------

    def validate(self) -> None:
        """Fail before any training, naming the field."""
        _check_methods(self)
        _check_numbers(self)
        _check_choices(self)
        _check_data(self)
        _check_split_points(self)
        _check_events(self)


def preset(name: str, **overrides) -> ExperimentConfig:
    """A preset from configs/ (`quick`, `cpu_scale`, ...) with fields overridden."""
    path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
        raise ValueError(f"unknown preset {name!r}; choose one of {choices} (files in {CONFIGS})")
    return ExperimentConfig.load(path).replace(**overrides)


def _bad(field_name, value, allowed):
    raise ValueError(f"config field {field_name!r}: {value!r} is not allowed; {allowed}")


def _check_methods(cfg: ExperimentConfig) -> None:
    for name in cfg.methods:
        if name not in METHODS:
            _bad("methods", name, f"choose from {', '.join(METHODS)}")
    if not cfg.methods:
        _bad("methods", cfg.methods, "name at least one method")


def _check_numbers(cfg: ExperimentConfig) -> None:
    for f in _POSITIVE_INTS:
        v = getattr(cfg, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            _bad(f, v, "a positive integer")
    if len(cfg.budgets) != cfg.num_clients:
        _bad("budgets", cfg.budgets, f"one budget per client ({cfg.num_clients})")
    for b in cfg.budgets:
        if not isinstance(b, (int, float)) or not b > 0 or not math.isfinite(b):
            _bad("budgets", b, "budgets must be positive numbers")
    if cfg.speeds is not None and (len(cfg.speeds) != cfg.num_clients or min(cfg.speeds) <= 0):
        _bad("speeds", cfg.speeds, f"{cfg.num_clients} positive FLOP/s values, or null")
    for f in ("bandwidth", "lr", "ft_lr", "delta"):
        if not getattr(cfg, f) > 0:
            _bad(f, getattr(cfg, f), "a positive number")
    if cfg.server_speed is not None and not cfg.server_speed > 0:
        _bad("server_speed", cfg.server_speed, "a positive number or null")
    for f, lo, hi, text in (("headroom", 0, 1, "[0, 1)"), ("beta_max", 0, 1, "[0, 1)")):
        if not lo <= getattr(cfg, f) < hi:
            _bad(f, getattr(cfg, f), f"a number in {text}")
    if cfg.server_adapter_budget is not None and not (isinstance(cfg.server_adapter_budget, (int, float))
                                                      and cfg.server_adapter_budget >= 0):
        _bad("server_adapter_budget", cfg.server_adapter_budget, "a non-negative number of bytes, or null (top rank)")
    if cfg.lora_alpha is not None and not (isinstance(cfg.lora_alpha, (int, float)) and cfg.lora_alpha > 0):
        _bad("lora_alpha", cfg.lora_alpha, "a positive number, or null for 2 x the top rank level")
    for f in ("val_fraction", "gamma"):
        if not 0 < getattr(cfg, f) < 1:
            _bad(f, getattr(cfg, f), "a number in (0, 1)")
    levels = cfg.rank_levels
    if 0 not in levels or any((not isinstance(r, int)) or r < 0 for r in levels) or len(set(levels)) < 2:
        _bad("rank_levels", levels, "non-negative integers including 0 and at least one positive rank")


def _check_choices(cfg: ExperimentConfig) -> None:
    if cfg.budget_unit not in ("weights", "bytes"):
        _bad("budget_unit", cfg.budget_unit, "'weights' (fractions of the model's weight bytes) or 'bytes'")
    if cfg.partition not in ("iid", "dirichlet"):
        _bad("partition", cfg.partition, "'iid' or 'dirichlet'")
    if cfg.partition_attribute not in E2E_ATTRIBUTES:
        _bad("partition_attribute", cfg.partition_attribute, f"one of {E2E_ATTRIBUTES}")


def _check_data(cfg: ExperimentConfig) -> None:
    if cfg.data == "builtin":
        return
    d = Path(cfg.data)
    if not d.is_dir():
        _bad("data", cfg.data, "'builtin' or an existing folder with devset.csv and testset_w_refs.csv")
    for f in ("devset.csv", "testset_w_refs.csv"):
        if not (d / f).is_file():
            _bad("data", cfg.data, f"the folder lacks {f}")


def _check_split_points(cfg: ExperimentConfig) -> None:
    if cfg.split_points is None:
        return
    from .architectures import num_blocks
    from .models import model_config

    n_blocks = num_blocks(model_config(cfg.model))
    if len(cfg.split_points) != cfg.num_clients:
        _bad("split_points", cfg.split_points, f"one split point per client ({cfg.num_clients}), or null")
    for s in cfg.split_points:
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= n_blocks - 1:
            _bad("split_points", s, f"split points must be integers in [1, {n_blocks - 1}] for "
                                    f"{cfg.model!r} ({n_blocks} blocks)")


def _check_events(cfg: ExperimentConfig) -> None:
    names = cfg.client_names()
    for i, e in enumerate(cfg.events):
        where = f"events[{i}]"
        if not isinstance(e, dict) or e.get("type") not in ("dropout", "budget"):
            _bad(where, e, "a mapping with type 'dropout' or 'budget'")
        client = e.get("client")
        if client not in names and not (isinstance(client, int) and 0 <= client < cfg.num_clients):
            _bad(f"{where}.client", client, f"one of {names} or an index below {cfg.num_clients}")
        if e["type"] == "dropout":
            if not (isinstance(e.get("start"), int) and isinstance(e.get("end"), int) and 1 <= e["start"] <= e["end"]):
                _bad(where, e, "dropout needs integer rounds 1 <= start <= end")
        else:
            if not (isinstance(e.get("round"), int) and e["round"] >= 1):
                _bad(f"{where}.round", e.get("round"), "an integer round >= 1")
            if not (isinstance(e.get("memory"), (int, float)) and e["memory"] > 0):
                _bad(f"{where}.memory", e.get("memory"), "a positive budget in the config's budget_unit")
