"""What each side of a run reads: the training pool, the validation rows and the test MRs of a config, and each
client's partition of the pool. The in-process runner and every client process build them here, identically."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .data import group_references, load_builtin, load_e2e, partition


@dataclass
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame  # grouped: mr, refs


def load_splits(cfg) -> Splits:
    """Training pool, validation rows and test MRs with grouped references, drawn with `eval_seed` (default: the
    run's seed), so that runs of several seeds can be scored on the same MRs."""
    seed = cfg.seed if cfg.eval_seed is None else cfg.eval_seed
    rng = np.random.default_rng(seed)
    if cfg.data == "builtin":
        train, val, test = load_builtin("train"), load_builtin("dev"), group_references(load_builtin("test"))
    else:
        d = Path(cfg.data)
        dev = load_e2e(d / "devset.csv")
        mrs = dev["mr"].unique()
        held = set(rng.choice(mrs, size=max(1, round(cfg.val_fraction * len(mrs))), replace=False))
        train, val = dev[~dev["mr"].isin(held)], dev[dev["mr"].isin(held)]
        test = group_references(load_e2e(d / "testset_w_refs.csv"))
    val = val.sample(n=min(cfg.val_examples, len(val)), random_state=seed).sort_index()
    test = test.sample(n=min(cfg.eval_mrs, len(test)), random_state=seed).sort_index()
    return Splits(train.reset_index(drop=True), val.reset_index(drop=True), test.reset_index(drop=True))


def client_partitions(cfg, splits: Splits) -> list[list[int]]:
    """Each client's rows of the training pool, by the config's partition scheme and seed."""
    return partition(list(splits.train["mr"]), cfg.num_clients, cfg.partition, cfg.seed, cfg.dirichlet_alpha,
                     cfg.partition_attribute)
