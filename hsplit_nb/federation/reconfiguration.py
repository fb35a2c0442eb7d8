"""What a re-plan changes, so that a reconfiguration restarts only that (spec section 3).

A matrix changes when its holders change: which present clients host its block, the rank of each client's
own adapter on it, or the rank of the main server's shared copy. A changed matrix has its learned delta that
is not yet in the frozen weights folded in, and every copy of it restarts; an unchanged one keeps its factors
and optimizer state. A client whose own adapter's ranks change is rebuilt, so every matrix it held or holds
counts as changed. Every reconfiguration is recorded as rows of reconfigurations.csv.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..adapters import layer_of


@dataclass
class Change:
    matrices: set[str]                                    # fold the unmerged delta, restart every copy
    rebuilt: list[str]                                    # clients whose own adapter is built afresh
    server_kept: list[str] = field(default_factory=list)  # shared-set matrices kept with weights and optimizer
    server_restarted: list[str] = field(default_factory=list)  # shared-set matrices built afresh (new or changed)
    server_removed: list[str] = field(default_factory=list)


def _holders(m: str, adapters: dict[str, tuple[int, dict[str, int]]], server: dict[str, int]) -> tuple:
    layer = layer_of(m)
    return tuple(sorted((c, layer < s, r.get(m, 0)) for c, (s, r) in adapters.items())), server.get(m, 0)


def plan_change(names: list[str], before: dict[str, tuple[int, dict[str, int]]],
                after: dict[str, tuple[int, dict[str, int]]], server_before: dict[str, int],
                server_after: dict[str, int], initial: bool = False) -> Change:
    """`before` / `after`: per present client, (split point, its own adapter's ranks); `server_*`: the shared
    set's ranks (empty without one). `initial`: everything is built afresh."""
    if initial:
        return Change(set(names), list(after), [], sorted(m for m, r in server_after.items() if r), [])
    rebuilt = [c for c in after if before.get(c, (None, None))[1] != after[c][1]]
    changed = {m for m in names if _holders(m, before, server_before) != _holders(m, after, server_after)}
    for c in rebuilt:
        changed |= {m for m, r in {**before.get(c, (0, {}))[1], **after[c][1]}.items() if r}
    kept = [m for m, r in server_after.items() if r and m not in changed and server_before.get(m) == r]
    restarted = [m for m, r in server_after.items() if r and m not in kept]
    removed = [m for m, r in server_before.items() if r and not server_after.get(m)]
    return Change(changed, rebuilt, kept, restarted, removed)


def _adapters(ranks: dict[str, int], split: int) -> str:
    """Device adapters as a reader scans them: `layer.kind:rank` for every positive rank, by layer."""
    kept = sorted((n for n, r in ranks.items() if r and layer_of(n) < split), key=lambda n: (layer_of(n), n))
    return " ".join(f"{layer_of(n)}.{n.rsplit('.', 1)[-1].removesuffix('_proj')}:{ranks[n]}" for n in kept)


def record(round_: int, cause: str, shift: float | None, before, after, server_before: dict[str, int],
           server_after: dict[str, int], change: Change) -> list[dict]:
    """Rows of reconfigurations.csv: one per present client (split point and device adapters before and after,
    what restarted), and one for the main server's shared set."""
    common = {"round": round_, "cause": cause, "importance_shift": shift}
    rows = []
    for c, (s, r) in after.items():
        s0, r0 = before.get(c, (0, {}))
        restarted = "rebuilt" if c in change.rebuilt else \
            f"{sum(1 for m, v in r.items() if v and m in change.matrices)} matrices"
        rows.append({**common, "holder": c, "split_before": s0, "split_after": s,
                     "adapters_before": sum(1 for n, v in r0.items() if v and layer_of(n) < s0),
                     "adapters_after": sum(1 for n, v in r.items() if v and layer_of(n) < s),
                     "device_adapters_before": _adapters(r0, s0), "device_adapters_after": _adapters(r, s),
                     "restarted": restarted})
    rows.append({**common, "holder": "server", "adapters_before": sum(1 for r in server_before.values() if r),
                 "adapters_after": sum(1 for r in server_after.values() if r),
                 "restarted": f"kept {len(change.server_kept)}, restarted {len(change.server_restarted)}, "
                              f"removed {len(change.server_removed)}"})
    return rows
