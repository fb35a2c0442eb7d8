"""The main server's parts own their state: each part's `state_dict` loads into the same part of a fresh server
built from the same configuration and gives back the same state, alone (the resume of every method from a
checkpoint is tested in test_method_table and test_experiment)."""
import dataclasses

import pytest
import torch

from conftest import preset_fields
from hsplit_nb.clientdata import load_splits
from hsplit_nb.config import ExperimentConfig
from hsplit_nb.experiment import _Run

QUICK = preset_fields("quick", final_metrics=False)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and _same(dataclasses.asdict(a), dataclasses.asdict(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _server(method: str, rounds: int):
    cfg = ExperimentConfig(**QUICK, methods=[method])
    fed = _Run(cfg, method, load_splits(cfg), None).fed
    fed.start()
    for r in range(1, rounds + 1):
        fed.run_round(r, fed.begin_round(r)["weights_down"])
    return fed


PARTS = {"aggregation": lambda f: f.aggregation, "calibrator": lambda f: f.calibrator, "clock": lambda f: f.clock,
         "server optimizers": lambda f: f.server_opts, "importance tracker": lambda f: f.tracker}


@pytest.mark.parametrize("method", ["hsplitlora", "splitlora"])
def test_each_parts_state_round_trips_alone(method):
    trained = _server(method, 1)
    for name, part in PARTS.items():
        fresh = _server(method, 0)
        if part(trained) is None or (name == "calibrator" and trained.tracker is None):  # SplitLoRA: no IWI
            continue
        saved = part(trained).state_dict()
        assert not _same(saved, part(fresh).state_dict()), name  # a round changed it: the check can fail
        if name == "server optimizers":  # optimizers over the adapters as they are: load those first
            fresh.aggregation.load_state_dict(trained.aggregation.state_dict())
        part(fresh).load_state_dict(saved)
        assert _same(part(fresh).state_dict(), saved), name
