"""The computations behind notebooks 02-04 (hsplit_nb.walkthrough): what each returns, checked by hand."""
import math

import pytest

from hsplit_nb.adapters import add_adapters, adapter_names, read_adapter
from hsplit_nb.costs import client_memory, measure_client_memory
from hsplit_nb.data import E2EDataset, load_builtin, loader
from hsplit_nb.importance import rngwp_scores
from hsplit_nb.models import tiny_model
from hsplit_nb.walkthrough import (
    bytes_per_aggregator, calibrated_fine_tune, merge_and_restart, plot_bytes_per_aggregator,
    plot_predicted_vs_measured, plot_score_trajectories, predicted_vs_measured, score_trajectories,
)


def _model_and_batches(n=6, seed=0):
    model, tok = tiny_model("llama", seed=seed)
    model = add_adapters(model, {"q": 4, "v": 4})
    batches = list(loader(E2EDataset(load_builtin("train").head(4 * n), tok, 256), tok, 4))
    return model, batches


def test_calibrated_fine_tune_scores_before_training_and_keeps_calibration_batches_apart():
    model, batches = _model_and_batches()
    twin, _ = _model_and_batches()
    first = rngwp_scores(twin, batches[-1])  # the same weights, the last batch: the first calibration
    history, losses = calibrated_fine_tune(model, batches, steps=5, calibrate_every=2, lr=1e-2)
    assert len(history) == 3 and len(losses) == 5  # calibrations before steps 0, 2 and 4
    assert history[0] == pytest.approx(first, rel=1e-6)
    assert history[2] != pytest.approx(history[0], rel=1e-3)  # training moved the scores
    assert all(math.isfinite(x) for x in losses)


def test_calibrated_fine_tune_refuses_too_few_batches():
    model, batches = _model_and_batches(n=3)
    with pytest.raises(ValueError, match=r"batches: 3 is too few; 6 steps calibrating every 2 need more than 3"):
        calibrated_fine_tune(model, batches, steps=6, calibrate_every=2, lr=1e-3)


def test_score_trajectories_are_ratios_to_the_first_calibration_of_the_last_top_matrices():
    history = [{"a": 1.0, "b": 2.0, "c": 4.0}, {"a": 3.0, "b": 1.0, "c": 2.0}]
    traj = score_trajectories(history, top=2)
    assert list(traj.columns) == ["a", "c"]  # the top two of the last calibration, best first
    assert traj["a"].tolist() == [1.0, 3.0] and traj["c"].tolist() == [1.0, 0.5]
    assert len(plot_score_trajectories(traj).axes[0].lines) == 3  # two matrices and the line at 1


def test_predicted_vs_measured_matches_the_cost_model_and_the_measurement():
    model, batches = _model_and_batches()
    check = predicted_vs_measured(model, [1, 2], batches[0], {"q": 4, "v": 4})
    for _, r in check.iterrows():
        s = int(r["split_point"])
        measured = sum(measure_client_memory(model, s, batches[0]).values()) / 2**20
        predicted = client_memory(model.config, s, {"q": 4, "v": 4}, 4, batches[0]["input_ids"].shape[1]) / 2**20
        assert r["measured_MiB"] == pytest.approx(measured) and r["predicted_MiB"] == pytest.approx(predicted)
        assert r["relative_error"] == pytest.approx(predicted / measured - 1)
    assert plot_predicted_vs_measured(check).axes[0].get_xlabel() == "measured MiB"


def test_merge_and_restart_keeps_the_output_and_the_ranks():
    model, batches = _model_and_batches()
    history, _ = calibrated_fine_tune(model, batches, steps=4, calibrate_every=4, lr=1e-2)
    assert any(read_adapter(model, n).B.abs().sum() > 0 for n in adapter_names(model))  # trained: B is not zero
    result = merge_and_restart(model, batches[0])
    assert result["max_output_change"] < 1e-4
    assert result["ranks_unchanged"] and result["every_B_zero"]


def test_bytes_per_aggregator_by_hand():
    table = bytes_per_aggregator([2, 4, 8, 8, 16], 576, 576)
    per_rank_kib = (576 + 576) * 4 / 2**10  # one rank of A and B in float32
    row = table.set_index("aggregator")
    assert row.loc["naa", "up_KiB"] == pytest.approx(38 * per_rank_kib)
    assert row.loc["naa", "down_KiB"] == pytest.approx(5 * 38 * per_rank_kib)  # B_cat, A_cat to all five
    assert row.loc["fedavg", "ranks"] == [8] * 5 and row.loc["fedavg", "down_KiB"] == pytest.approx(40 * per_rank_kib)
    assert row.loc["hetlora", "down_KiB"] == pytest.approx(38 * per_rank_kib)
    assert len(plot_bytes_per_aggregator(table, "576 x 576").axes[0].patches) == 8
