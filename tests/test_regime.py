"""Testbeds and the regime map (spec section 3, 'Testbeds'): where ARMSC can give clients different split points,
from configs alone; one colour per method in every figure."""
import matplotlib
import pytest

from hsplit_nb.config import ConfigError, preset
from hsplit_nb.costs import weight_bytes
from hsplit_nb.methods import METHODS
from hsplit_nb.models import model_config
from hsplit_nb.regime import regime_map

matplotlib.use("Agg")
BUDGETS = {"quick": [4.5e6, 8e6, 11.5e6]}


@pytest.fixture(scope="module")
def tiny_map():
    return regime_map(model_config("tiny-llama"), BUDGETS, server_ratios=(0.5, 1, 2, 5, 1000),
                      bandwidths=(1e8, 1e10), local_steps=(1, 10), seq_len=256, progress=False)


def test_a_server_far_faster_than_the_clients_keeps_every_client_at_split_1(tiny_map):
    h = tiny_map[(tiny_map["method"] == "hsplitlora") & (tiny_map["server_ratio"] == 1000)]
    assert len(h) == 4 and (h["splits"] == "1/1/1").all()


def test_a_bottleneck_server_puts_the_richer_clients_deeper(tiny_map):
    h = tiny_map[(tiny_map["method"] == "hsplitlora") & (tiny_map["server_ratio"] == 0.5)]
    for splits in h["splits"]:
        s = [int(x) for x in splits.split("/")]
        assert s == sorted(s) and s[-1] > s[0]  # budgets rise from c0 to c2
    assert (tiny_map[tiny_map["method"] == "splitlora"]["distinct_splits"] == 1).all()


def test_the_mean_split_never_grows_with_the_servers_speed(tiny_map):
    h = tiny_map[tiny_map["method"] == "hsplitlora"]
    for _, part in h.groupby(["bandwidth", "local_steps"]):
        means = part.sort_values("server_ratio")["mean_split"].tolist()
        assert all(a >= b for a, b in zip(means, means[1:])), means


def test_each_row_prices_its_plan_and_the_ratio_is_hsplitloras_round_over_splitloras(tiny_map):
    for _, point in tiny_map.groupby(["server_ratio", "bandwidth", "local_steps"]):
        by = point.set_index("method")
        assert by.loc["hsplitlora", "round_vs_splitlora"] == pytest.approx(
            by.loc["hsplitlora", "round_s"] / by.loc["splitlora", "round_s"], rel=1e-12)
        assert (point["round_s"] >= point["step_s"]).all()
    assert set(tiny_map.columns) >= {"budgets", "server_ratio", "server_flops", "bandwidth", "local_steps", "method",
                                     "splits", "device_adapters", "device_rank_total", "step_s", "round_s"}


def test_the_regime_map_figure_draws_both_panels_per_bandwidth(tiny_map):
    from hsplit_nb.plots import plot_regime_map

    fig = plot_regime_map(tiny_map)
    assert len(fig.axes) == 2 * 2 * 2  # two rows of heat maps per bandwidth, each with its colour bar
    matplotlib.pyplot.close(fig)


def test_a_testbed_sets_the_speeds_and_the_server_to_an_exact_flops():
    cfg = preset("cpu_scale", testbed="edge")
    model = model_config(cfg.model)
    sim = cfg.resolved(model)
    w = weight_bytes(model)
    assert sim.speeds == pytest.approx([1e3 * b * w for b in cfg.budgets], rel=1e-12)
    assert sim.server_speed == pytest.approx(5 * 1e3 * max(cfg.budgets) * w, rel=1e-12)
    assert sim.bandwidth == 1e8 and sim.testbed is None and preset("cpu_scale").resolved(model) == preset("cpu_scale")


@pytest.mark.parametrize("field,value,message", [
    ("testbed", "edgy", "one of ['cloud', 'edge', 'recorded']"),
    ("server_speed", 1e12, "null when a testbed is named (testbed 'edge' sets it)"),
    ("bandwidth", 3e7, "1e+08 or the default when a testbed is named"),
])
def test_a_testbed_beside_its_own_values_is_refused_by_name(field, value, message):
    import re

    with pytest.raises(ConfigError, match=rf"config field '{field}'.*{re.escape(message)}"):
        preset("quick", **{"testbed": "edge", field: value})


def test_every_method_has_its_own_colour_and_the_curves_use_it():
    import pandas as pd

    from hsplit_nb.plots import METHOD_COLORS, method_color, plot_ppl_rounds

    assert set(METHODS) <= set(METHOD_COLORS) and len(set(METHOD_COLORS.values())) == len(METHOD_COLORS)
    df = pd.DataFrame({"method": ["hsplitlora", "flexlora"] * 2, "round": [0, 0, 1, 1], "val_ppl": [5, 6, 4, 5]})
    fig = plot_ppl_rounds(df)
    colours = {line.get_label(): line.get_color() for line in fig.axes[0].get_lines()}
    assert colours == {"hsplitlora": method_color("hsplitlora"), "flexlora": method_color("flexlora")}
    assert colours["hsplitlora"] != colours["flexlora"]
    matplotlib.pyplot.close(fig)


def test_each_method_is_priced_with_its_own_aggregators_traffic():
    """The map prices SplitLoRA's round with the rule the method table gives it (FedAvg sends each client its own
    factors), not with NAA's stacked factors."""
    from hsplit_nb.aggregation import AGGREGATORS
    from hsplit_nb.regime import SPLITLORA_AGGREGATOR
    assert METHODS["splitlora"].aggregator is AGGREGATORS[SPLITLORA_AGGREGATOR]
    assert METHODS["hsplitlora"].aggregator is AGGREGATORS["naa"]
