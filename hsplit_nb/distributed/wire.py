"""Point-to-point messages over torch.distributed: tensors behind a small shape/dtype header, pickled
control messages, an explicit timeout on every wait, and the bytes counted per peer and kind.

Split points and sequence lengths differ between clients, so a receiver cannot know a tensor's shape
in advance: every tensor is preceded by a fixed header of HEADER_LEN int64 values (a magic number, the
message kind, the dtype and the shape). A timeout or a dead peer raises `PeerLost` naming the peer;
gloo closes that peer's connection and keeps the others.
"""
from __future__ import annotations

import pickle
from collections import defaultdict
from datetime import timedelta

import torch
import torch.distributed as dist

from ..federation.ledger import BYTE_KINDS
from ..federation.messages import VOCABULARY, Message

MAGIC = 0x48534C4E  # "HSLN"
MAX_DIMS = 5
HEADER_LEN = 4 + MAX_DIMS  # magic, kind, dtype, ndim, shape
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
          torch.bool]
# What crosses the cut and the round boundary: the simulation's accounting, then the protocol's messages it does
# not model ("control": every message's fields; "sync": a resumed run's state).
KINDS = [*BYTE_KINDS, "control", "sync"]


class PeerLost(RuntimeError):
    """A peer died, closed its connection or did not answer within the timeout."""

    def __init__(self, peer: int, what: str, cause: BaseException):
        self.peer, self.what = peer, what
        super().__init__(f"rank {peer}: {what} failed ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})")


class Wire:
    """This rank's end of the point-to-point links, with byte counters.

    `device`: where transport tensors live (CPU for gloo, the rank's GPU for NCCL). `timeout`: seconds
    any single send or receive may take before the peer counts as lost."""

    def __init__(self, timeout: float, device="cpu"):
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout, self.device = float(timeout), torch.device(device)
        self.sent: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.received: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    # ---- raw tensors ------------------------------------------------------------------------------

    def _wait(self, work, peer: int, what: str, timeout: float | None) -> None:
        try:
            work.wait(timedelta(seconds=timeout or self.timeout))
        except RuntimeError as exc:
            raise PeerLost(peer, what, exc) from exc

    def _post(self, fn, tensor, peer, what):
        try:
            return fn(tensor, peer)
        except RuntimeError as exc:  # a closed connection can fail at posting already
            raise PeerLost(peer, what, exc) from exc

    def send(self, peer: int, tensor: torch.Tensor, kind: str) -> None:
        """Send one tensor (header, then payload); its payload bytes count under `kind`."""
        code = KINDS.index(kind)
        if tensor.dtype not in DTYPES or tensor.dim() > MAX_DIMS:
            raise ValueError(f"cannot send a {tensor.dtype} tensor of {tensor.dim()} dims; "
                             f"dtypes {DTYPES}, at most {MAX_DIMS} dims")
        shape = list(tensor.shape) + [0] * (MAX_DIMS - tensor.dim())
        header = torch.tensor([MAGIC, code, DTYPES.index(tensor.dtype), tensor.dim(), *shape], dtype=torch.int64,
                              device=self.device)
        payload = tensor.detach().to(self.device).contiguous()
        what = f"sending {kind}"
        self._wait(self._post(dist.isend, header, peer, what), peer, what, None)
        if payload.numel():
            self._wait(self._post(dist.isend, payload, peer, what), peer, what, None)
        self.sent[peer]["header"] += header.numel() * 8
        self.sent[peer][kind] += payload.numel() * payload.element_size()

    def recv(self, peer: int, kind: str, timeout: float | None = None) -> torch.Tensor:
        """Receive one tensor of the given kind from `peer` (a different kind is a protocol error)."""
        what = f"waiting for {kind}"
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        self._wait(self._post(dist.irecv, header, peer, what), peer, what, timeout)
        magic, code, dtype, ndim, *shape = header.tolist()
        if magic != MAGIC or not 0 <= code < len(KINDS) or not 0 <= dtype < len(DTYPES):
            raise RuntimeError(f"rank {peer} sent a malformed header {header.tolist()}")
        if KINDS[code] != kind:
            raise RuntimeError(f"protocol error: expected {kind} from rank {peer}, got {KINDS[code]}")
        tensor = torch.empty(shape[:ndim], dtype=DTYPES[dtype], device=self.device)
        if tensor.numel():
            self._wait(self._post(dist.irecv, tensor, peer, what), peer, what, timeout)
        self.received[peer]["header"] += header.numel() * 8
        self.received[peer][kind] += tensor.numel() * tensor.element_size()
        return tensor

    # ---- control messages and named tensors -----------------------------------------------------

    def send_obj(self, peer: int, obj, kind: str = "control") -> None:
        """A small Python object (a command, plans, scalars), pickled."""
        self.send(peer, torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8), kind)

    def recv_obj(self, peer: int, kind: str = "control", timeout: float | None = None):
        return pickle.loads(self.recv(peer, kind, timeout).cpu().numpy().tobytes())

    def send_tensors(self, peer: int, tensors: dict[str, torch.Tensor], kind: str) -> None:
        """Named tensors: their names as a control message, then each tensor under `kind`."""
        self.send_obj(peer, list(tensors))
        for t in tensors.values():
            self.send(peer, t, kind)

    def recv_tensors(self, peer: int, kind: str, timeout: float | None = None) -> dict[str, torch.Tensor]:
        names = self.recv_obj(peer, timeout=timeout)
        return {n: self.recv(peer, kind, timeout) for n in names}

    def send_message(self, peer: int, msg: Message) -> None:
        """A message in its wire form: its fields as a control message, then its tensors under its kind."""
        head, tensors = msg.to_wire()
        self.send_obj(peer, head)
        for t in tensors:
            self.send(peer, t, msg.kind)

    def recv_message(self, peer: int, timeout: float | None = None) -> Message:
        head = self.recv_obj(peer, timeout=timeout)
        cls = VOCABULARY.get(head.get("op")) if isinstance(head, dict) else None
        if cls is None:
            raise RuntimeError(f"protocol error: rank {peer} sent {head!r}, not a message of the vocabulary")
        return Message.from_wire(head, [self.recv(peer, cls.kind, timeout) for _ in range(head["tensors"])])

    def counts(self) -> dict[int, dict[str, dict[str, int]]]:
        """{peer: {"sent": {kind: bytes}, "received": {kind: bytes}}}."""
        peers = sorted(set(self.sent) | set(self.received))
        return {p: {"sent": dict(self.sent[p]), "received": dict(self.received[p])} for p in peers}
