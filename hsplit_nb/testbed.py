"""Testbeds: the hardware a federation is simulated on, named, with presets in configs/testbeds/.

A testbed is the main server's speed, the clients' speeds and the links. Whether ARMSC can give clients
different split points at all depends on it (docs/method.md, "Testbeds"; `regime.regime_map`): a server far
faster than every client is never the bottleneck, so offloading blocks to the devices never pays. Client speeds
are proportional to their memory budgets; the server's is a multiple of the fastest client's, resolved to an
exact FLOP/s once per run, so that every method's planning rule sees the same server.
"""
from __future__ import annotations

from pathlib import Path

from .config import CONFIGS, Positive, TypedConfig, _bad
from .costs import DEFAULT_BANDWIDTH, FLOPS_PER_BUDGET_BYTE
from .io import read_mapping

TESTBEDS = CONFIGS / "testbeds"


class Testbed(TypedConfig):
    """Server speed as a multiple of the fastest client's, client FLOP/s per budget byte, link bytes/s."""
    about: str = ""
    server_ratio: Positive
    client_flops_per_budget_byte: Positive = FLOPS_PER_BUDGET_BYTE
    bandwidth: Positive = DEFAULT_BANDWIDTH

    def client_speeds(self, budget_bytes) -> list[float]:
        return [self.client_flops_per_budget_byte * b for b in budget_bytes]

    def server_speed(self, budget_bytes) -> float:
        """The server's exact FLOP/s for these budgets: `server_ratio` x the fastest client."""
        return self.server_ratio * max(self.client_speeds(budget_bytes))


def testbed_names() -> list[str]:
    return sorted(p.stem for p in TESTBEDS.glob("*.yaml"))


def load_testbed(name: str) -> Testbed:
    """A testbed preset by name (configs/testbeds/<name>.yaml)."""
    path = Path(TESTBEDS / f"{name}.yaml")
    if not path.is_file():
        _bad("testbed", name, f"one of {testbed_names()} (files in {TESTBEDS})")
    return Testbed(**read_mapping(path))


def check_testbed(cfg) -> None:
    """A testbed sets the speeds and links: naming it beside its own values is a conflict, not an override."""
    tb = load_testbed(cfg.testbed)
    for name in ("speeds", "server_speed"):
        if getattr(cfg, name) is not None:
            _bad(name, getattr(cfg, name), f"null when a testbed is named (testbed {cfg.testbed!r} sets it)")
    if cfg.bandwidth not in (DEFAULT_BANDWIDTH, tb.bandwidth):
        _bad("bandwidth", cfg.bandwidth, f"{tb.bandwidth:g} or the default when a testbed is named (testbed "
                                         f"{cfg.testbed!r} sets it)")
