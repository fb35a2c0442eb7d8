"""Every widget driven through its callback, headlessly: set values, check the data it produces."""
import math

import matplotlib
import pandas as pd
import pytest

from hsplit_nb.models import tiny_model
from hsplit_nb.costs import client_memory
from hsplit_nb.widgets import (
    aggregation_errors, importance_grid, iwi_panel, naa_panel, planner_panel, planner_table, replay_importance,
    split_costs, split_panel,
)

matplotlib.use("Agg")


@pytest.fixture
def config():
    return tiny_model("llama")[0].config


def test_split_panel_follows_the_slider(config):
    panel = split_panel(config, batch_size=4, seq_len=64)
    assert panel.result["split_point"] == 3  # min(6, L - 1)
    panel.controls["split_point"].value = 1
    row = panel.result["row"]
    assert panel.result["split_point"] == 1 and row["split_point"] == 1
    assert row["client_memory_MiB"] * 2**20 == pytest.approx(client_memory(config, 1, {"q": 8, "v": 8}, 4, 64))
    table = split_costs(config, 4, 64)
    assert list(table["split_point"]) == [1, 2, 3]
    assert table["client_memory_MiB"].is_monotonic_increasing


def test_iwi_panel_replays_with_new_settings():
    history = [{"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, {"a": 3.0, "b": 1.0}, {"a": 3.0, "b": 1.0}]
    panel = iwi_panel(history)
    assert panel.result["fires"].tolist() == [False, False, True, False]
    panel.controls["delta"].value = 0.5  # the shift at calibration 2 (about 0.41) stays below 0.5
    assert not panel.result["fires"].any()
    panel.controls["beta_max"].value = 0.0
    assert panel.result["beta"].tolist() == [0.0, 0.0, 0.0, 0.0]
    frame = replay_importance(history, beta_max=0.0, delta=0.1)
    assert frame.loc[2, "shift"] == pytest.approx(2 * abs(0.75 - 0.5))


def test_planner_panel_updates_table_and_reports_bad_budgets(config):
    full = client_memory(config, 3, 16, 4, 64) / 1e9
    panel = planner_panel(config, n_clients=3, budgets=[full * 0.5e9, full * 0.7e9, full * 1e9], batch_size=4,
                          seq_len=64, max_budget=full * 2e9)
    first = panel.result
    assert isinstance(first, pd.DataFrame) and len(first) == 3
    assert (first["memory_GB"] <= first["budget_GB"]).all()
    assert panel.controls["b0"].description == "client0 MB"  # a tiny model's budgets never read 0.00 GB
    assert panel.controls["b0"].value == pytest.approx(full * 0.5 * 1e3, rel=0.02)
    panel.controls["b0"].value = full * 2 * 1e3
    assert panel.result.loc[0, "budget_GB"] == pytest.approx(full * 2)
    assert panel.result.loc[0, "split_point"] >= first.loc[0, "split_point"]
    panel.controls["rank_levels"].value = (2,)
    assert panel.result["device_rank_total"].max() <= 2 * 7 * 3
    panel.controls["b1"].value = panel.controls["b1"].min  # too small for any split: the message, no crash
    assert isinstance(panel.result, str) and "client 'client1'" in panel.result


def test_naa_panel_shows_nan_fedavg_for_mixed_ranks_and_zero_naa_error():
    panel = naa_panel(3)
    frame = panel.result.set_index("aggregator")
    assert frame.loc["NAA (stack)", "relative_error"] < 1e-12
    assert frame.loc["zero-pad + average", "relative_error"] > 1e-3
    assert math.isnan(frame.loc["FedAvg (A, B apart)", "relative_error"])
    for k in range(3):
        panel.controls[f"r{k}"].value = 4
    frame = panel.result.set_index("aggregator")
    assert frame.loc["FedAvg (A, B apart)", "relative_error"] > 1e-3
    assert frame.loc["NAA (stack)", "bytes_down"] == 3 * 12 * (64 + 64) * 4
    for k in range(3):
        panel.controls[f"w{k}"].value = 0
    assert "nothing to aggregate" in panel.result
    assert panel.out.outputs[0]["text"].startswith("no client has both")


def test_fedavg_with_mixed_ranks_says_why_it_does_not_apply():
    frame = aggregation_errors([2, 4, 8], [1, 1, 1]).set_index("aggregator")
    assert frame.loc["FedAvg (A, B apart)", "note"].startswith("does not apply: FedAvg averages A and B")
    assert frame.loc["NAA (stack)", "note"] == ""


def _png_pixels(bundle):
    import base64
    import io

    from matplotlib.image import imread

    assert bundle["output_type"] == "display_data"
    return imread(io.BytesIO(base64.b64decode(bundle["data"]["image/png"])), format="png")


@pytest.mark.parametrize("make, control, value", [
    (lambda cfg: split_panel(cfg, 4, 64), "split_point", 1),
    (lambda cfg: iwi_panel([{"a": 1.0, "b": 1.0}, {"a": 3.0, "b": 1.0}]), "delta", 0.5),
    (lambda cfg: planner_panel(cfg, 2, [4e6, 6e6], 4, 64, max_budget=1e7), "b0", 8.0),
    (lambda cfg: naa_panel(3), "r0", 16),
])
def test_panels_set_their_output_directly_with_a_drawn_figure_and_no_pyplot_state(config, make, control, value):
    """What a browser shows: the Output widget's contents, replaced in one assignment (no kernel capture, which a
    comm thread would send to the Log Console), figures drawn outside pyplot, and never blank."""
    import matplotlib.pyplot as plt

    plt.close("all")
    panel = make(config)
    before = panel.out.outputs
    panel.controls[control].value = value
    after = panel.out.outputs
    assert after != before
    figures = [b for b in after if "image/png" in b.get("data", {})]
    assert len(figures) == 1
    pixels = _png_pixels(figures[0])
    assert pixels.shape[0] > 100 and pixels.std() > 0.01  # a drawn figure, not a blank area
    assert plt.get_fignums() == []  # pyplot's global figure list was never touched


def test_slider_starting_values_sit_on_their_grid_so_showing_them_recomputes_nothing(config):
    panel = iwi_panel([{"a": 1.0, "b": 1.0}, {"a": 3.0, "b": 1.0}])
    beta = panel.controls["beta_max"]
    assert beta.value == beta.min + beta.step * round((beta.value - beta.min) / beta.step)  # what the front end sends
    calls = []
    panel.compute = lambda **v: calls.append(v) or panel.result
    beta.value = beta.min + beta.step * round((beta.value - beta.min) / beta.step)
    panel.update()  # a change message with the values already shown
    assert calls == []


def test_updates_from_many_threads_leave_the_output_of_the_last_values(config):
    import threading

    panel = split_panel(config, 4, 64)
    threads = [threading.Thread(target=setattr, args=(panel.controls["split_point"], "value", s)) for s in (1, 2, 3, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = panel.controls["split_point"].value
    assert panel.result["split_point"] == final
    assert panel.out.outputs[0]["text"].startswith(f"split point {final}:")


def test_plain_functions(config):
    from hsplit_nb.adapters import candidate_matrices

    scores = {m.name: float(m.layer) for m in candidate_matrices(config)}
    grid = importance_grid(scores, config)
    assert grid.shape == (4, 7) and grid.loc[3, "q"] == 3.0
    assert len(planner_table(config, [1e9, 2e9], batch_size=2, seq_len=16)) == 2
    assert len(aggregation_errors([2, 0, 4], [1, 1, 1])) == 3


def test_regime_panel_reads_the_map_at_the_chosen_point():
    from hsplit_nb.models import model_config
    from hsplit_nb.regime import regime_map
    from hsplit_nb.widgets import regime_panel

    table = regime_map(model_config("tiny-llama"), {"quick": [4.5e6, 8e6, 11.5e6]}, server_ratios=(0.5, 5, 1000),
                       bandwidths=(1e8,), local_steps=(1, 10), seq_len=256, progress=False)
    panel = regime_panel(table, 4)
    assert panel.result[["server_ratio", "local_steps"]].drop_duplicates().values.tolist() == [[5, 10]]
    assert list(panel.result["method"]) == ["hsplitlora", "splitlora"]
    panel.controls["server_ratio"].value = 0.5
    assert panel.result["splits"].tolist() == ["1/2/3", "1/1/1"]
    assert "faster" in panel.shown[0] and len(panel.shown) == 3
