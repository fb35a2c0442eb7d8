"""The byte ledger: what each client moved in a round, by kind.

Both transports feed the same ledger: the in-process simulation and the multi-process runner count the
same tensors, so a round's bytes (and the simulated seconds the clock charges for them) are the same
whichever carried them.
"""
from __future__ import annotations

BYTE_KINDS = ("smashed_up", "grad_down", "adapter_up", "adapter_down", "weights_down", "calibration_up")


def zero_bytes() -> dict[str, int]:
    return dict.fromkeys(BYTE_KINDS, 0)


class Ledger:
    """Bytes per client and kind for one round."""

    def __init__(self, names):
        self.bytes = {n: zero_bytes() for n in names}

    def add(self, client: str, kind: str, n: int) -> None:
        self.bytes[client][kind] += n

    def adapter_bytes(self, client: str) -> int:
        """What a client moves for an aggregation: adapter factors up and down (weights downloaded at the round's
        start are timed there, once)."""
        return sum(v for k, v in self.bytes[client].items() if k.startswith("adapter"))
