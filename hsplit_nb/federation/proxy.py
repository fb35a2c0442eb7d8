"""The one interface through which the main server talks to a client, whatever the transport.

As Flower's `ClientProxy`, an abstract class: a transport posts a message (the client starts on it) and
collects the reply of an answered one when the server needs it, so a remote client works while the server
talks to the others (a `Step` to all, then each reply in turn). `InProcess` runs a client's stages in this
process; `distributed.remote.RemoteClient` carries the same messages to a client process. A client that is
lost (its process died or fell silent) sets `lost` to the reason and answers nothing more; the server reads
that value and leaves the client out, it does not see an exception.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from .messages import ClientStages, Message


class ClientProxy(ABC):
    """The server's link to one client. A transport missing `post` or `collect` cannot be built."""
    lost: str | None = None

    @abstractmethod
    def post(self, msg: Message) -> None:
        """Deliver `msg`; the client starts on it at once where it runs apart."""

    @abstractmethod
    def collect(self, msg: Message) -> Message | None:
        """The reply to `msg`, an answered message posted last to this client (None once lost)."""


class InProcess(ClientProxy):
    """A client in this process: a message without a reply runs when posted, an answered one when collected
    (so the simulation computes each client's forward just before the server's stage, one graph at a time)."""

    def __init__(self, stages: ClientStages):
        self.stages = stages
        self._waiting: Message | None = None

    def post(self, msg: Message) -> None:
        if msg.answered:
            self._waiting = msg
        else:
            msg.handle(self.stages)

    def collect(self, msg: Message) -> Message | None:
        if self._waiting is not msg:
            raise RuntimeError(f"collect({type(msg).__name__}) without posting it first")
        self._waiting = None
        return msg.handle(self.stages)
