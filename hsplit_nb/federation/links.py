"""The main server's links to its clients: every message goes out and every reply comes back through a client's
`ClientProxy`. A client whose link is lost leaves for good: `lost` keeps why, the round's notes say so, and
`on_lost(client, why)` hears of it; the caller gets None instead of a reply, never an exception."""
from __future__ import annotations

import sys

from .clients import Client
from .messages import Message
from .proxy import ClientProxy


class Links:
    def __init__(self, proxies: dict[str, ClientProxy], on_lost=None):
        self.proxies, self.on_lost = proxies, on_lost
        self.lost: dict[str, str] = {}  # client -> why it was lost
        self.notes: list[str] = []      # what happened during the round

    def post(self, c: Client, msg: Message) -> None:
        """Send client c a message."""
        proxy = self.proxies[c.name]
        if not proxy.lost:
            proxy.post(msg)
            self._check(c, proxy)

    def collect(self, c: Client, msg: Message):
        """Client c's reply to the answered message posted last (None: the client is lost)."""
        proxy = self.proxies[c.name]
        if proxy.lost:
            return None
        out = proxy.collect(msg)
        return None if self._check(c, proxy) else out

    def ask(self, c: Client, msg: Message):
        """Post a message and, if it is answered, wait for the reply."""
        self.post(c, msg)
        return self.collect(c, msg) if msg.answered else None

    def _check(self, c: Client, proxy: ClientProxy) -> bool:
        if not proxy.lost:
            return False
        c.present, c.excluded = False, True
        self.lost[c.name] = proxy.lost
        self.notes.append(f"lost: {c.name} ({proxy.lost})")
        print(f"[server] lost client {c.name}: {proxy.lost}", file=sys.stderr, flush=True)
        if self.on_lost is not None:
            self.on_lost(c.name, proxy.lost)
        return True

    def mark_lost(self, clients: list[Client]) -> None:
        """Clients whose link was lost before this federation began (a client process gone between methods)."""
        for c in clients:
            if self.proxies[c.name].lost:
                c.present, c.excluded = False, True

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes
