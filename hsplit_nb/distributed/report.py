"""Tables of a multi-process run: bytes on the wire per method, client and kind, against the simulation's
accounting, and the largest difference between two results tables."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..federation.ledger import BYTE_KINDS
from .entry import DONE_FILE


def wire_bytes(out) -> pd.DataFrame:
    """Bytes that crossed the wire per method, client and kind, from the server's counters
    (`*_up` received from the client, `*_down` sent to it; control, sync and header separately)."""
    done = json.loads((Path(out) / DONE_FILE).read_text())
    rows = []
    for method, clients in done["wire"].items():
        for client, c in clients.items():
            row = {"method": method, "client": client}
            for direction, counts in c.items():
                for kind, v in counts.items():
                    if kind.endswith("_up") and direction == "received" or kind.endswith("_down") and direction == "sent":
                        row[kind] = v
                    elif not kind.endswith(("_up", "_down")):
                        row[f"{kind}_{'down' if direction == 'sent' else 'up'}"] = v
            rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["method", "client"]).fillna(0)


def wire_vs_simulated(wire: pd.DataFrame, clients: pd.DataFrame) -> pd.DataFrame:
    """Per method and kind: bytes counted on the wire and bytes the simulation accounted (clients.csv of
    the same config), summed over clients and rounds."""
    real = wire.groupby("method")[[k for k in BYTE_KINDS if k in wire]].sum().stack()
    sim = clients.groupby("method")[list(BYTE_KINDS)].sum().stack()
    table = pd.DataFrame({"wire": real, "simulated": sim}).fillna(0).astype("int64")
    table.index.names = ["method", "kind"]
    return table.reset_index()


def compare_runs(real: pd.DataFrame, simulated: pd.DataFrame,
                 columns=("val_ppl", "train_loss", "sim_time_s", "bytes_up", "bytes_down")) -> pd.DataFrame:
    """Largest absolute difference per method and column between two results tables (same config)."""
    keys = ["method", "round"]
    both = real.set_index(keys)[list(columns)].merge(simulated.set_index(keys)[list(columns)], left_index=True,
                                                      right_index=True, how="left", suffixes=("", "_sim"))
    diff = pd.DataFrame({c: (both[c] - both[f"{c}_sim"]).abs() for c in columns})
    return diff.groupby("method").max().reset_index()
