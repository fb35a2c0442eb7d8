"""One settings source: the experiment config, its defaults beside it, its validation and its units.

A typed config (pydantic): every field's type and range is declared beside its default, and an error names
the field, the value and what is allowed. Everything a run needs round-trips through JSON and YAML (YAML
1.2 numbers, duplicate keys refused). Budgets are converted to bytes once (`budget_bytes`); the presets in
configs/ are files of this config that notebooks, tests and benchmarks load with overrides (`preset`).
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .costs import DEFAULT_BANDWIDTH, weight_bytes
from .data import E2E_ATTRIBUTES
from .io import atomic_write_text, read_mapping
from .methods import ABLATIONS, METHODS, PAPER_METHODS
from .planner import DEFAULT_RANK_LEVELS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# the paper's 5-20 GB budgets as fractions of LLaMA-2-7B's fp16 weight bytes (13.48 GB), evenly spaced
PAPER_BUDGET_FRACTIONS = [round(gb / 13.48, 4) for gb in (5.0, 8.75, 12.5, 16.25, 20.0)]
MAX_L1_SHIFT = 2.0  # the IWI trigger compares an L1 distance of two distributions: never above 2


class ConfigError(ValueError):
    """A config that cannot run; the message names the field, the value and what is allowed."""


def _number(v):
    """Numbers only: a bool is not a number, and numpy scalars become Python ones."""
    if isinstance(v, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


Int = Annotated[int, BeforeValidator(_number)]
Float = Annotated[float, BeforeValidator(_number), Field(allow_inf_nan=False)]
PositiveInt = Annotated[Int, Field(ge=1)]
NonNegativeInt = Annotated[Int, Field(ge=0)]
Positive = Annotated[Float, Field(gt=0)]
Fraction = Annotated[Float, Field(gt=0, lt=1)]


def _client_ref(v):
    v = _number(v) if not isinstance(v, str) else v
    if isinstance(v, int) and v >= 0 or isinstance(v, str):
        return v
    raise ValueError("a client name such as 'c0', or a client index")


def device_name(name: str) -> str:
    """A name torch can parse as a device (availability is `check_device`'s question)."""
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError("a torch device such as 'cpu', 'cuda' or 'cuda:0'") from None
    return name


Device = Annotated[str, AfterValidator(device_name)]  # parsed here; availability in validate()
ClientRef = Annotated[Union[str, int], Field(union_mode="left_to_right"), BeforeValidator(_client_ref)]


class DropoutEvent(BaseModel):
    """A client away for rounds start..end (inclusive)."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["dropout"]
    client: ClientRef
    start: PositiveInt
    end: PositiveInt


class BudgetEvent(BaseModel):
    """A client's memory budget changes from a round on (in the config's budget_unit)."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["budget"]
    client: ClientRef
    round: PositiveInt
    memory: Positive


Event = Annotated[Union[DropoutEvent, BudgetEvent], Field(discriminator="type")]


class TypedConfig(BaseModel):
    """A pydantic model whose errors are one `ConfigError` line per wrong field."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __init__(self, **fields):
        try:
            super().__init__(**fields)
        except ValidationError as exc:
            raise ConfigError(describe(exc, type(self))) from None


class ExperimentConfig(TypedConfig):
    """Everything an experiment needs, typed and range-checked; round-trips through JSON and YAML."""

    model: Annotated[str, Field(min_length=1)] = "smollm2-135m"
    data: Annotated[str, Field(min_length=1)] = "builtin"  # "builtin", or a folder with E2E's two CSV files
    num_clients: PositiveInt = 5
    budgets: list[Positive] = Field(default_factory=lambda: list(PAPER_BUDGET_FRACTIONS))
    budget_unit: Literal["weights", "bytes"] = "weights"  # weights: fractions of the model's weight bytes
    speeds: list[Positive] | None = None  # FLOP/s per client; default proportional to budget
    bandwidth: Positive = DEFAULT_BANDWIDTH
    server_speed: Positive | None = None
    testbed: str | None = None  # configs/testbeds/<name>.yaml: sets speeds, server_speed and bandwidth together
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: Positive = 0.5
    partition_attribute: Literal[tuple(E2E_ATTRIBUTES)] = "eatType"
    rounds: PositiveInt = 5
    local_steps: PositiveInt = 5
    batch_size: PositiveInt = 8
    seq_len: Annotated[Int, Field(ge=2)] = 64
    lr: Positive = 1e-3
    ft_lr: Positive = 5e-5
    rank_levels: list[NonNegativeInt] = Field(default_factory=lambda: list(DEFAULT_RANK_LEVELS))
    server_adapter_budget: Annotated[Float, Field(ge=0)] | None = None  # bytes for the shared server adapters
    lora_alpha: Positive | None = None  # scale = alpha / r, alpha fixed across ranks (null: 2 x the top rank)
    headroom: Annotated[Float, Field(ge=0, lt=1)] = 0.1
    split_points: list[PositiveInt] | None = None  # fixed split point per client for ARMSC methods
    iwi_interval: PositiveInt = 5
    beta_max: Annotated[Float, Field(ge=0, lt=1)] = 0.9
    delta: Positive = 0.1  # an L1 shift of importance (at most 2)
    gamma: Fraction = 0.9  # HetLoRA's regulariser keeps the first ceil(gamma r) rank components free
    seed: NonNegativeInt = 0
    eval_seed: NonNegativeInt | None = None  # draws the validation hold-out and the test MRs (null: seed)
    val_fraction: Fraction = 0.1  # E2E folder: share of the development MRs held out for validation PPL
    val_examples: PositiveInt = 128
    eval_mrs: PositiveInt = 20
    num_beams: PositiveInt = 4
    eval_batch_size: PositiveInt | None = None  # MRs per generation batch (null: batch_size)
    max_new_tokens: PositiveInt = 60
    final_metrics: Annotated[bool, Field(strict=True)] = True
    events: list[Event] = Field(default_factory=list)
    methods: Annotated[list[str], Field(min_length=1)] = Field(default_factory=lambda: PAPER_METHODS + ABLATIONS)
    device: Device = "cpu"

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, names):
        unknown = [n for n in names if n not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        if len(set(names)) != len(names):
            raise ValueError("each method once")
        return names

    @field_validator("rank_levels")
    @classmethod
    def _levels(cls, levels):
        if 0 not in levels or len(set(levels)) < 2 or len(set(levels)) != len(levels):
            raise ValueError("distinct non-negative integers including 0 and at least one positive rank")
        return levels

    @field_validator("delta")
    @classmethod
    def _reachable_delta(cls, delta):
        if delta >= MAX_L1_SHIFT:
            raise ValueError(f"a number in (0, {MAX_L1_SHIFT:g}): the IWI trigger compares an L1 shift of two "
                             f"importance distributions, which is never above {MAX_L1_SHIFT:g}")
        return delta


    @model_validator(mode="after")
    def _per_client_lists(self):
        n = self.num_clients
        for name in ("budgets", "speeds", "split_points"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                _bad(name, value, f"one value per client ({n}; num_clients)")
        _check_events(self)
        if self.testbed is not None:
            from .testbed import check_testbed

            check_testbed(self)
        return self

    # ---- files and copies ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return self.model_dump()

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a config is a mapping of fields, got {type(d).__name__}")
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
        """Read a .yaml/.yml or .json config; errors name the file and the field."""
        data = read_mapping(path)
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

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

    def resolved(self, model_config) -> "ExperimentConfig":
        """The config a run is simulated with: a testbed's client and server FLOP/s and bandwidth made explicit
        for these budgets (itself when no testbed is named)."""
        if self.testbed is None:
            return self
        from .testbed import load_testbed

        tb, budgets = load_testbed(self.testbed), self.budget_bytes(model_config)
        return self.replace(testbed=None, speeds=tb.client_speeds(budgets), server_speed=tb.server_speed(budgets),
                            bandwidth=tb.bandwidth)

    def events_in_bytes(self, model_config) -> list[dict]:
        """The event schedule with client names and budget events' memory in bytes."""
        names, scale, out = self.client_names(), self.budget_scale(model_config), []
        for e in self.events:
            e = e.model_dump()
            if isinstance(e["client"], int):
                e["client"] = names[e["client"]]
            if e["type"] == "budget":
                e["memory"] = e["memory"] * scale
            out.append(e)
        return out

    # ---- validation ------------------------------------------------------------------------------

    def validate(self) -> None:
        """What the types cannot say, checked before any training: the data folder, the device this torch
        build has, split points and budgets (initial and in events) against the model's blocks and memory."""
        _check_data(self)
        check_device(self.device)
        if self.split_points is not None or any(METHODS[m].splits for m in self.methods):
            _check_model_fit(self)


def preset(name: str, **overrides) -> ExperimentConfig:
    """A preset from configs/ (`quick`, `cpu_scale`, ...) with fields overridden."""
    path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
        raise ValueError(f"unknown preset {name!r}; choose one of {choices} (files in {CONFIGS})")
    return ExperimentConfig.load(path).replace(**overrides)


def _bad(field_name, value, allowed):
    """Raise the one-line error; inside a validator pydantic catches it (a ValueError) and `describe` keeps it."""
    raise ConfigError(f"config field {field_name!r}: {value!r} is not allowed; {allowed}")


def _loc(parts) -> str:
    """A pydantic error location as a reader writes it: `events[0].round` (the union's tag left out)."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p not in ("dropout", "budget", "str", "int"):
            out += f".{p}" if out else str(p)
    return out


def describe(exc: ValidationError, model=None) -> str:
    """One line per wrong field: the field, the value and what is allowed."""
    lines, seen = [], set()
    for e in exc.errors():
        loc, msg = _loc(e["loc"]), e["msg"].removeprefix("Value error, ")
        if e["loc"][:1] in seen:  # one line per field: a list's first bad element stands for the rest
            continue
        seen.add(e["loc"][:1])
        if not loc or msg.startswith("config field"):
            lines.append(msg)
        elif e["type"] == "missing":
            lines.append(f"config field {loc!r} is missing")
        elif e["type"] == "extra_forbidden":
            lines.append(f"unknown config field {loc!r}; known fields: {', '.join((model or ExperimentConfig).model_fields)}")
        else:
            lines.append(f"config field {loc!r}: {e['input']!r} is not allowed; {msg[0].lower() + msg[1:]}")
    return "\n".join(lines)


def _check_events(cfg: ExperimentConfig) -> None:
    """Clients exist, rounds lie within the run, and no round is left without a client."""
    names, away = cfg.client_names(), {r: set() for r in range(1, cfg.rounds + 1)}
    for i, e in enumerate(cfg.events):
        where = f"events[{i}]"
        client = names[e.client] if isinstance(e.client, int) and e.client < cfg.num_clients else e.client
        if client not in names:
            _bad(f"{where}.client", e.client, f"one of {names} or an index below {cfg.num_clients}")
        rounds = (e.start, e.end) if e.type == "dropout" else (e.round,)
        for key, r in zip(("start", "end") if e.type == "dropout" else ("round",), rounds):
            if r > cfg.rounds:
                _bad(f"{where}.{key}", r, f"a round in 1..{cfg.rounds} (rounds)")
        if e.type == "dropout":
            if e.end < e.start:
                _bad(f"{where}.end", e.end, f"a round >= start ({e.start})")
            for r in range(e.start, e.end + 1):
                away[r].add(client)
    empty = [r for r, gone in away.items() if len(gone) == cfg.num_clients]
    if empty:
        raise ValueError(f"config field 'events': every client drops out in round {empty[0]}; at least one client "
                         "must be present in every round")


def _check_data(cfg: ExperimentConfig) -> None:
    if cfg.data == "builtin":
        return
    d = Path(cfg.data)
    if not d.is_dir():
        _bad("data", cfg.data, "'builtin' or an existing folder with devset.csv and testset_w_refs.csv")
    for f in ("devset.csv", "testset_w_refs.csv"):
        if not (d / f).is_file():
            _bad("data", cfg.data, f"the folder lacks {f}")


def check_device(name: str) -> None:
    import torch

    dev = torch.device(name)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            _bad("device", name, "'cpu': this torch build or machine has no CUDA device")
        if dev.index is not None and dev.index >= count:
            _bad("device", name, f"'cpu' or cuda:0..cuda:{count - 1} ({count} CUDA devices here)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        _bad("device", name, "'cpu': MPS is not available here")
    elif dev.type not in ("cpu", "cuda", "mps"):
        _bad("device", name, "'cpu', 'cuda' or 'cuda:N' (or 'mps' on Apple silicon)")


def _check_model_fit(cfg: ExperimentConfig) -> None:
    """Split points within the model's blocks, and every budget (at the start and in events) large enough
    for the smallest split configuration, so a run never fails rounds later for it."""
    from .architectures import num_blocks
    from .costs import smallest_budget
    from .models import model_config

    config = model_config(cfg.model)
    n_blocks = num_blocks(config)
    for s in cfg.split_points or []:
        if not 1 <= s <= n_blocks - 1:
            _bad("split_points", s, f"integers in [1, {n_blocks - 1}] for {cfg.model!r} ({n_blocks} blocks)")
    scale = cfg.budget_scale(config)
    need = smallest_budget(config, cfg.batch_size, cfg.seq_len, min(r for r in cfg.rank_levels if r), cfg.headroom)
    least = f"{math.ceil(need)} bytes" if cfg.budget_unit == "bytes" else f"{need / scale:.6g} x the model's weight bytes"
    places = [(f"budgets[{k}]", b, "") for k, b in enumerate(cfg.budgets)] + \
        [(f"events[{i}].memory", e.memory, f"; it is client {e.client}'s budget from round {e.round}")
         for i, e in enumerate(cfg.events) if e.type == "budget"]
    for where, b, whose in places:
        if b * scale < need:
            _bad(where, b, f"at least {least}: the smallest split configuration of "
                           f"{cfg.model!r} (split point 1, one adapter at the lowest rank, batch {cfg.batch_size} x "
                           f"{cfg.seq_len} tokens, headroom {cfg.headroom}){whose}")
