"""The one vocabulary between the main server and a client: a typed message per operation and per reply.

A message's class name is the operation's name everywhere: the server sends `Configure(...)`, every client
handles it in `ClientStages.configure`, and the wire carries "Configure". Each message owns its wire form
(`to_wire`/`from_wire`, as Flower's serde pairs): its fields with every tensor replaced by a slot, and the
tensors in slot order under the message's byte kind, the kind the byte ledger counts them under. A message
with `answered` set has a reply, collected by the server when it needs it (`ClientProxy.collect`).
Factors are keyed `matrix|A` / `matrix|B`; merges and folds are (matrix, B_cat, A_cat) with delta B_cat A_cat.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch


class Message:
    """A message between the server and a client. `kind`: the byte kind of its tensors ("control": none)."""
    kind: ClassVar[str] = "control"
    answered: ClassVar[bool] = False

    def handle(self, client: "ClientStages"):
        raise TypeError(f"{type(self).__name__} is a reply; no client handles it")

    def to_wire(self) -> tuple[dict, list[torch.Tensor]]:
        """(fields with tensors replaced by slots, the tensors in slot order); the fields include the op."""
        tensors: list[torch.Tensor] = []
        fields = {f.name: _pack(getattr(self, f.name), tensors) for f in dataclasses.fields(self)}
        return {"op": type(self).__name__, "fields": fields, "tensors": len(tensors)}, tensors

    @staticmethod
    def from_wire(head: dict, tensors: list[torch.Tensor]) -> "Message":
        cls = VOCABULARY.get(head.get("op"))
        if cls is None:
            raise ValueError(f"unknown message {head.get('op')!r}; the vocabulary is {sorted(VOCABULARY)}")
        return cls(**{k: _unpack(v, tensors) for k, v in head["fields"].items()})


@dataclass(frozen=True)
class _Slot:
    index: int


def _pack(value, tensors: list):
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _Slot(len(tensors) - 1)
    if isinstance(value, dict):
        return {k: _pack(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_pack(v, tensors) for v in value)
    return value


def _unpack(value, tensors: list):
    if isinstance(value, _Slot):
        return tensors[value.index]
    if isinstance(value, dict):
        return {k: _unpack(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_unpack(v, tensors) for v in value)
    return value


# ---- what the server asks ----------------------------------------------------------------------------

@dataclass
class Open(Message):
    """Serve one method's federation; the client answers with its name (`Hello`)."""
    method: str
    answered: ClassVar[bool] = True

    def handle(self, client):
        return client.open(self)


@dataclass
class Sync(Message):
    """Everything a client held at a checkpoint, for a resumed run (its optimizer state included)."""
    split_point: int
    ranks: dict[str, int]
    generation: int
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict | None = None
    kind: ClassVar[str] = "sync"

    def handle(self, client):
        return client.sync(self)


@dataclass
class Configure(Message):
    """A new plan: the client's split point and device-side ranks. Only what changed restarts: the client's own
    adapter is rebuilt when its ranks changed (`rebuild`), else the changed matrices restart (`restarts`); the
    learned deltas of changed matrices its device held are folded into the frozen weights first (`folds`); a
    deeper split brings the frozen weights of the newly hosted blocks (`blocks`)."""
    split_point: int
    ranks: dict[str, int]
    generation: int
    rebuild: bool
    restarts: list[str] = field(default_factory=list)
    folds: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    blocks: list[dict[str, torch.Tensor]] = field(default_factory=list)
    kind: ClassVar[str] = "weights_down"

    def handle(self, client):
        return client.configure(self)


@dataclass
class Away(Message):
    """The client is away for `round` (a client process logs it and keeps its waits short)."""
    round: int

    def handle(self, client):
        return client.away(self)


@dataclass
class CatchUp(Message):
    """For a client back from an absence: the merged weights of its device side and, for non-merging methods,
    its device-side factors; for merging methods its adapter restarts at `generation`."""
    restart: bool
    generation: int
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    kind: ClassVar[str] = "weights_down"

    def handle(self, client):
        return client.catch_up(self)


@dataclass
class BeginRound(Message):
    round: int

    def handle(self, client):
        return client.begin_round(self)


@dataclass
class Step(Message):
    """A local step on the mini-batch at `positions` of the client's partition (the server keeps every client's
    data cursor): the device part's forward (`Smashed`), or for a method that does not split the whole step
    (`Loss`). With `calibrate`, IWI rides on the step."""
    positions: list[int]
    calibrate: bool = False
    answered: ClassVar[bool] = True

    def handle(self, client):
        return client.step(self)


@dataclass
class Backward(Message):
    """The smashed data's gradient: the client's backward and optimizer step. `scored`: the step calibrates, and
    the client answers with its device side's RNGWP scores."""
    grad: torch.Tensor
    scored: bool = False
    kind: ClassVar[str] = "grad_down"

    @property
    def answered(self) -> bool:  # only a calibrating step waits for the client's backward
        return self.scored

    def handle(self, client):
        return client.backward(self)


@dataclass
class Upload(Message):
    """Send the device-side adapter factors for an aggregation (`Factors`)."""
    answered: ClassVar[bool] = True

    def handle(self, client):
        return client.upload(self)


@dataclass
class Apply(Message):
    """The result of an aggregation for one client: merges on its device side (then a restart at
    `generation`), or its new factors."""
    restart: bool
    generation: int
    merges: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    kind: ClassVar[str] = "adapter_down"

    def handle(self, client):
        return client.apply(self)


@dataclass
class OptimizerState(Message):
    """Send the device-side optimizer's state, for the server's checkpoint (`Optimizer`)."""
    answered: ClassVar[bool] = True

    def handle(self, client):
        return client.optimizer_state(self)


@dataclass
class Finish(Message):
    """This method's rounds are over; with `dump`, a client process writes its final state (for checks)."""
    dump: bool = False

    def handle(self, client):
        return client.finish(self)


@dataclass
class End(Message):
    """The launch is over: a client process says goodbye (`Hello`) and exits (not a client stage)."""
    answered: ClassVar[bool] = True


# ---- what a client answers -----------------------------------------------------------------------------

@dataclass
class Hello(Message):
    client: str
    pid: int = 0


@dataclass
class Smashed(Message):
    """The device part's output at the cut, with the mask and labels the server's part needs."""
    hidden: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    kind: ClassVar[str] = "smashed_up"


@dataclass
class Loss(Message):
    value: float


@dataclass
class Scores(Message):
    """The device side's RNGWP scores, float64, one per device-side matrix in `side_matrices` order."""
    values: torch.Tensor
    kind: ClassVar[str] = "calibration_up"


@dataclass
class Factors(Message):
    tensors: dict[str, torch.Tensor]
    kind: ClassVar[str] = "adapter_up"


@dataclass
class Optimizer(Message):
    state: dict | None
    kind: ClassVar[str] = "sync"


VOCABULARY: dict[str, type[Message]] = {c.__name__: c for c in (
    Open, Sync, Configure, Away, CatchUp, BeginRound, Step, Backward, Upload, Apply, OptimizerState, Finish, End,
    Hello, Smashed, Loss, Scores, Factors, Optimizer)}


class ClientStages(ABC):
    """What a client does on each message of the vocabulary: one method per operation, named as the message.
    A client missing one cannot be built."""

    @abstractmethod
    def open(self, msg: Open) -> Hello: ...

    @abstractmethod
    def sync(self, msg: Sync) -> None: ...

    @abstractmethod
    def configure(self, msg: Configure) -> None: ...

    @abstractmethod
    def away(self, msg: Away) -> None: ...

    @abstractmethod
    def catch_up(self, msg: CatchUp) -> None: ...

    @abstractmethod
    def begin_round(self, msg: BeginRound) -> None: ...

    @abstractmethod
    def step(self, msg: Step) -> Smashed | Loss: ...

    @abstractmethod
    def backward(self, msg: Backward) -> Scores | None: ...

    @abstractmethod
    def upload(self, msg: Upload) -> Factors: ...

    @abstractmethod
    def apply(self, msg: Apply) -> None: ...

    @abstractmethod
    def optimizer_state(self, msg: OptimizerState) -> Optimizer: ...

    @abstractmethod
    def finish(self, msg: Finish) -> None: ...
