"""The server's side of a client process: `RemoteClient` carries each message over the wire in its own wire
form (`Message.to_wire`), and reads the reply of an answered one when the server collects it.

A peer that dies or falls silent raises `PeerLost` in the wire; the proxy records it in `lost` and answers
nothing from then on, so the server sees a value, not an exception.
"""
from __future__ import annotations

from ..federation.messages import End, Message
from ..federation.proxy import ClientProxy
from .wire import PeerLost, Wire


class RemoteClient(ClientProxy):
    """The client in the process of rank `rank` (the process and its link live across methods)."""

    def __init__(self, wire: Wire, rank: int):
        self.wire, self.rank = wire, rank
        self.lost: str | None = None

    def post(self, msg: Message) -> None:
        if not self.lost:
            self._guard(self.wire.send_message, self.rank, msg)

    def collect(self, msg: Message) -> Message | None:
        return None if self.lost else self._guard(self.wire.recv_message, self.rank)

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except PeerLost as exc:
            self.lost = str(exc)
            return None

    def end(self) -> None:
        """The launch is over: the process says goodbye and exits."""
        if self.lost:
            return
        try:
            self.wire.send_message(self.rank, End())
            self.wire.recv_message(self.rank, timeout=min(self.wire.timeout, 30.0))
        except (PeerLost, RuntimeError):
            pass
