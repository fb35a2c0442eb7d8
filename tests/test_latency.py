"""One time model: ARMSC plans with the federation's own clock, so the round time it predicts for its plan is
the round time the clock charges; the clock's state round-trips alone."""
import pytest

from conftest import preset_fields
from hsplit_nb.clientdata import load_splits
from hsplit_nb.config import ExperimentConfig
from hsplit_nb.experiment import _Run
from hsplit_nb.federation import Clock
from hsplit_nb.latency import TimeModel, round_seconds
from hsplit_nb.planner import armsc_splits

# the CPU-scale preset (five clients, batch 8, 4 local steps, one calibration per round) on the tiny model, with
# budgets in bytes for it, at 256 tokens: its byte-level tokens fill every batch, so what crosses the cut is
# exactly what the time model predicts
CPU_SCALE = preset_fields("cpu_scale", model="tiny-llama", seq_len=256, budget_unit="bytes",
                          budgets=[7e6, 9e6, 11e6, 13e6, 15e6], rounds=1, val_examples=8, eval_mrs=2, num_beams=1,
                          max_new_tokens=4, final_metrics=False)


def _first_round(method="hsplitlora", **overrides):
    cfg = ExperimentConfig(**{**CPU_SCALE, **overrides}, methods=[method])
    run = _Run(cfg, method, load_splits(cfg), None)
    rows, client_rows = [], []
    run.run(rows, client_rows, lambda *a: None)
    return cfg, run.fed, rows, client_rows


@pytest.mark.parametrize("method,speeds", [("hsplitlora", None), ("hsplitlora", [1e9, 1.5e9, 2e9, 2.5e9, 3e9]),
                                          ("hsplitlora-no-naa", [1e9, 1.5e9, 2e9, 2.5e9, 3e9])])
def test_armscs_predicted_round_time_is_the_round_time_the_clock_charges(method, speeds):
    """For NAA and for the zero-padding rule of the no-NAA ablation: the traffic ARMSC charges is the aggregator's."""
    overrides = {} if speeds is None else {"speeds": speeds, "server_speed": 5 * max(speeds), "bandwidth": 1e7}
    cfg, fed, rows, client_rows = _first_round(method, **overrides)
    charged = rows[1]["sim_time_s"] - rows[0]["sim_time_s"]
    present = fed.present
    x = fed._plan_inputs()
    splits = [c.split_point for c in present]
    ranks = [fed.aggregation.device_ranks(c) for c in present]
    predicted = round_seconds(x.config, x.specs, splits, ranks, [s.flops for s in x.specs], None, cfg.batch_size,
                              cfg.seq_len, fed.p, x.round_costs, fed.matrices, time_model=fed.clock.time)
    assert predicted == pytest.approx(charged, rel=1e-9)
    # and that is the time ARMSC minimised: its choice from the same inputs is the plan the round ran
    assert armsc_splits(x.config, x.specs, None, x.batch_size, x.seq_len, x.levels, x.dtype_bytes, x.headroom,
                        x.server_speed, x.round_costs, fed.clock.time) == splits
    traffic = fed.method.aggregator.traffic(fed.matrices, ranks, splits, x.round_costs.server_rank)
    assert traffic == [r["adapter_up"] + r["adapter_down"] for r in client_rows if r["round"] == 1]


def test_the_time_model_counts_what_the_wire_moves_and_the_spec_counts_the_smashed_data_twice():
    from hsplit_nb.models import model_config
    config = model_config("tiny-llama")
    spec, wire = TimeModel.of(config, 4, 256), TimeModel.of(config, 4, 256, wire=True)
    assert spec.cut_bytes == 2 * 4 * 256 * 32 * 4
    assert wire.cut_bytes == spec.cut_bytes + 2 * 4 * 256 * 8             # mask and labels, int64
    assert wire.moved(3, calibrates=True) == wire.cut_bytes + 8 * 7 * 3   # 7 matrices per block, float64 scores


def test_the_clock_state_round_trips_alone():
    from hsplit_nb.models import model_config
    clock = Clock(TimeModel.of(model_config("tiny-llama"), 4, 64))
    clock.seconds = 12.5
    other = Clock(clock.time)
    other.load_state_dict(clock.state_dict())
    assert other.seconds == 12.5 and other.state_dict() == {"seconds": 12.5}


def test_one_planning_computes_each_clients_device_ranks_once(monkeypatch):
    """The split search fills the problem's device ranks; the rank plan that follows reuses them, computing no
    client's memory model again."""
    from hsplit_nb import planner
    cfg = ExperimentConfig(**CPU_SCALE, methods=["hsplitlora"])
    fed = _Run(cfg, "hsplitlora", load_splits(cfg), None).fed
    x = fed._plan_inputs()
    splits = fed.method.split.choose(x)
    assert all((k, s) in x.problem._ranks for k, s in enumerate(splits))
    built = []
    real = planner.ClientMemory
    monkeypatch.setattr(planner, "ClientMemory", lambda *a: built.append(a[2]) or real(*a))
    fed.method.ranks.choose(x, splits)
    assert built == []


def test_one_planning_builds_the_candidates_and_the_sizes_once(monkeypatch):
    from hsplit_nb import adapters, costs, planner
    cfg = ExperimentConfig(**CPU_SCALE, methods=["hsplitlora"])
    fed = _Run(cfg, "hsplitlora", load_splits(cfg), None).fed
    x = fed._plan_inputs()
    counts = {"candidates": 0, "dims": 0}
    real_candidates, real_dims = adapters.candidate_matrices, costs.Dims.of.__func__

    def candidates(*a):
        counts["candidates"] += 1
        return real_candidates(*a)

    def dims(cls, *a):
        counts["dims"] += 1
        return real_dims(cls, *a)

    for module in (adapters, costs, planner):
        monkeypatch.setattr(module, "candidate_matrices", candidates)
    monkeypatch.setattr(costs.Dims, "of", classmethod(dims))
    fed.method.ranks.choose(x, fed.method.split.choose(x))
    assert counts == {"candidates": 1, "dims": 1}
