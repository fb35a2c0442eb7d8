"""ARMSC: the memory model against measurement, the latency model, and the solver's guarantees."""
import itertools

import pytest
import torch

from hsplit_nb.adapters import add_adapters, candidate_matrices
from hsplit_nb.models import tiny_model
from hsplit_nb.paper import paper_budgets, paper_configs
from hsplit_nb.costs import (
    ClientSpec, Dims, block_flops, client_memory, head_flops, measure_client_memory, smashed_bytes, weight_bytes,
)
from hsplit_nb.latency import step_latency
from hsplit_nb.planner import plan

RANK_SETTINGS = {
    "llama": [{"q": 2, "v": 2}, {"q": 8, "k": 4, "v": 8, "o": 2, "gate": 2, "up": 4, "down": 16},
              {"model.layers.2.mlp.down_proj": 4, "model.layers.3.self_attn.v_proj": 2, "model.layers.4.mlp.up_proj": 8}],
    "gpt2": [{"c_attn": 4}, {"c_attn": 2, "attn.c_proj": 4, "c_fc": 8, "mlp.c_proj": 16},
             {"transformer.h.2.mlp.c_proj": 4, "transformer.h.3.attn.c_proj": 2, "transformer.h.4.mlp.c_fc": 8}],
}


def _six_blocks(family):
    return tiny_model(family, **({"num_hidden_layers": 6} if family == "llama" else {"n_layer": 6}))[0]


def _measure_batch(b=4, t=48):
    ids = torch.randint(3, 250, (b, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[-1, -2:] = 0  # a padded batch, as training sees them
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("setting", [0, 1, 2])
def test_memory_model_matches_measurement_at_every_split(family, setting):
    ranks = RANK_SETTINGS[family][setting]
    model = add_adapters(_six_blocks(family), ranks)
    batch = _measure_batch()
    for s in range(1, 6):
        measured = measure_client_memory(model, s, batch)
        predicted = client_memory(model.config, s, ranks, 4, 48, breakdown=True)
        err = abs(sum(predicted.values()) - sum(measured.values())) / sum(measured.values())
        assert err <= 0.10, (s, predicted, measured)
        assert measured["activations"] > 0 or s <= 2  # setting 2 has no adapter below block 2
        assert predicted["weights"] == measured["weights"] and predicted["smashed"] == measured["smashed"]


def test_first_adapter_position_drives_activation_memory():
    """Blocks before the first adapter save nothing: an adapter in block 0 costs more than one in block 4."""
    cfg = _six_blocks("llama").config
    early = client_memory(cfg, 5, {"model.layers.0.self_attn.q_proj": 2}, 4, 48, breakdown=True)
    late = client_memory(cfg, 5, {"model.layers.4.self_attn.q_proj": 2}, 4, 48, breakdown=True)
    assert early["adapters"] == late["adapters"] and early["activations"] > 3 * late["activations"]


def test_latency_model_formula():
    cfg = _six_blocks("llama").config
    dims = Dims.of(cfg)
    out = step_latency(cfg, [2, 4], speeds=[1e9, 2e9], bandwidths=[1e6, 1e6], server_speed=1e10, batch_size=4,
                       seq_len=32)
    fb, hf, sm = block_flops(dims, 4, 32), head_flops(dims, 4, 32), smashed_bytes(cfg, 4, 32)
    assert out["clients"] == pytest.approx([2 * fb / 1e9 + 2 * sm / 1e6, 4 * fb / 2e9 + 2 * sm / 1e6])
    assert out["server"] == pytest.approx(((6 - 2) * fb + hf + (6 - 4) * fb + hf) / 1e10)
    assert out["step"] == max(out["clients"] + [out["server"]])


def _clients(budgets, speed=2e9):
    return [ClientSpec(f"c{k}", b, speed=speed, bandwidth=1e9) for k, b in enumerate(budgets)]


def test_split_is_latency_optimal_and_ties_go_deeper():
    cfg = _six_blocks("llama").config
    clients = [ClientSpec("a", 5e6, speed=1e9), ClientSpec("b", 5e6, speed=3e9), ClientSpec("c", 5e6, speed=6e9)]
    p = plan(cfg, clients, batch_size=4, seq_len=32, server_speed=1e10)
    best = min(step_latency(cfg, s, [c.speed for c in clients], [c.bandwidth for c in clients], 1e10, 4, 32)["step"]
               for s in itertools.product(range(1, 6), repeat=3))
    assert p.step_latency == pytest.approx(best, rel=1e-12)
    chosen = [c.split_point for c in p.clients]
    ties = [s for s in itertools.product(range(1, 6), repeat=3) if step_latency(
        cfg, s, [c.speed for c in clients], [c.bandwidth for c in clients], 1e10, 4, 32)["step"] <= best * (1 + 1e-12)]
    assert sum(chosen) == max(sum(s) for s in ties)
    assert chosen == sorted(chosen)  # the faster client hosts more blocks


def test_larger_budget_never_gets_a_shallower_split_or_less_rank():
    cfg = _six_blocks("llama").config
    others = [3.0e6, 4.0e6]
    previous = None
    for budget in [1.3e6, 1.6e6, 2.0e6, 2.5e6, 3.2e6, 4.5e6, 8e6]:
        p = plan(cfg, _clients([budget] + others), batch_size=4, seq_len=32, server_adapter_budget=2e5,
                 server_speed=1e11)
        mine = p.clients[0]
        now = (mine.split_point, sum(mine.ranks.values()))
        if previous is not None:
            assert now[0] >= previous[0] and now[1] >= previous[1], (budget, previous, now)
        previous = now


def test_higher_importance_gets_rank_first():
    """With room for exactly one rank-16 adapter, the important matrix gets it, whichever it is."""
    cfg = _six_blocks("llama").config
    names = [m.name for m in candidate_matrices(cfg)]
    for hot in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        importance = {n: 1.0 for n in names}
        importance[hot] = 100.0
        budget = client_memory(cfg, 2, {hot: 16}, 4, 32) / 0.9 * 1.0001
        p = plan(cfg, [ClientSpec("a", budget, speed=1e9)], importance=importance, batch_size=4, seq_len=32,
                 fixed_split_points=[2], server_adapter_budget=1e4)
        device = p.clients[0].device_ranks()
        assert device[hot] == 16 and sum(device.values()) == 16, device


def test_plan_respects_every_budget_and_measured_memory_fits():
    model = _six_blocks("gpt2")
    budgets = [1.4e6, 2.5e6, 4e6]
    p = plan(model.config, _clients(budgets), batch_size=4, seq_len=48, headroom=0.1)
    for c in p.clients:
        assert c.memory <= 0.9 * c.budget
        measured = measure_client_memory(add_adapters(_six_blocks("gpt2"), c.ranks), c.split_point, _measure_batch())
        assert sum(measured.values()) <= c.budget
    frame = p.frame()
    assert list(frame.columns[:3]) == ["client", "split_point", "budget_GB"] and len(frame) == 3


def test_budget_too_small_names_client_budget_and_minimum():
    cfg = _six_blocks("llama").config
    with pytest.raises(ValueError, match=r"client 'poor': budget 0\.000 GB \(1000 bytes\) fits no split point; "
                                         r"the smallest budget that fits is") as info:
        plan(cfg, [ClientSpec("poor", 1000)], batch_size=4, seq_len=32)
    need = int(str(info.value).split("GB (")[2].split(" bytes")[0])
    assert plan(cfg, [ClientSpec("poor", need)], batch_size=4, seq_len=32).clients[0].split_point == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank_levels=(2, 4)), "rank_levels must contain 0"),
    (dict(headroom=1.0), r"headroom 1.0 is not allowed; a number in \[0, 1\)"),
    (dict(importance={"nope": 1.0}), "importance names unknown matrices"),
    (dict(fixed_split_points=[1, 2]), "needs one split per client"),
])
def test_plan_argument_errors(kwargs, match):
    cfg = _six_blocks("llama").config
    with pytest.raises(ValueError, match=match):
        plan(cfg, [ClientSpec("a", 1e7)], batch_size=4, seq_len=32, **kwargs)
    with pytest.raises(ValueError, match="memory -5 is not allowed; a positive number of bytes"):
        ClientSpec("neg", -5)


@pytest.mark.parametrize("name", ["llama-2-7b", "gpt2-large"])
def test_paper_scale_plans_from_configs_alone(name):
    cfg = paper_configs()[name]
    budgets = paper_budgets()
    assert budgets == [5e9, 8.75e9, 12.5e9, 16.25e9, 20e9]
    p = plan(cfg, [ClientSpec(f"client{k}", b) for k, b in enumerate(budgets)], batch_size=8, seq_len=128,
             dtype=torch.float16)
    splits = [c.split_point for c in p.clients]
    assert splits == sorted(splits)  # richer (faster) clients host more blocks
    assert all(c.memory <= 0.9 * c.budget for c in p.clients)
    if name == "llama-2-7b":
        assert weight_bytes(cfg, torch.float16) == pytest.approx(13.48e9, rel=0.01)


def test_on_the_cpu_scale_preset_armsc_rounds_are_no_slower_than_everyone_at_the_weakest_split():
    """ARMSC minimises the time of a round (local steps, calibrations, aggregation traffic), so its plan is never
    slower per round than every client at SplitLoRA's weakest-client split, nor than the step-optimal splits."""
    from hsplit_nb.config import preset
    from hsplit_nb.models import model_config
    from hsplit_nb.latency import RoundCosts, round_seconds
    from hsplit_nb.planner import armsc_splits, plan, weakest_split

    cfg = preset("cpu_scale")
    config = model_config(cfg.model)
    clients = [ClientSpec(n, b) for n, b in zip(cfg.client_names(), cfg.budget_bytes(config))]
    costs = RoundCosts(cfg.local_steps, cfg.local_steps / cfg.iwi_interval, cfg.top_rank)
    speeds = [c.flops for c in clients]
    server = 10 * max(speeds)
    common = (cfg.batch_size, cfg.seq_len, cfg.rank_levels, 4, cfg.headroom)

    def seconds(splits):
        ranks = [cp.ranks for cp in plan(config, clients, None, *common, fixed_split_points=splits).clients]
        return round_seconds(config, clients, splits, ranks, speeds, server, cfg.batch_size, cfg.seq_len, 4, costs)

    chosen = armsc_splits(config, clients, None, *common, round_costs=costs)
    weakest = [weakest_split(config, clients, *common)] * len(clients)
    step_optimal = armsc_splits(config, clients, None, *common)
    assert seconds(chosen) <= seconds(weakest) * (1 + 1e-12)
    # here the deeper splits that save step time cost more in traffic than they save (1.33 s against 1.43 s)
    assert chosen != step_optimal and seconds(chosen) < seconds(step_optimal)


def test_budget_order_ranks_spread_the_levels_and_ties_share_the_highest_place():
    """HetLoRA's ranks: 5 clients over levels 2-16 in budget order (2, 4, 8, 8, 16, whatever the clients'
    order); equal budgets share one rank, so a homogeneous federation is plain rank-16 LoRA."""
    from hsplit_nb.planner import budget_order_ranks

    specs = [ClientSpec(f"c{k}", m) for k, m in enumerate([5.0, 1.0, 4.0, 2.0, 3.0])]
    assert budget_order_ranks(specs, [0, 2, 4, 8, 16]) == {"c1": 2, "c3": 4, "c4": 8, "c2": 8, "c0": 16}
    assert set(budget_order_ranks([ClientSpec(f"c{k}", 7.0) for k in range(5)], [0, 2, 4, 8, 16]).values()) == {16}
    tied = budget_order_ranks([ClientSpec(f"c{k}", m) for k, m in enumerate([1.0, 1.0, 2.0, 2.0, 3.0])],
                              [0, 2, 4, 8, 16])
    assert tied == {"c0": 4, "c1": 4, "c2": 8, "c3": 8, "c4": 16}  # places 1, 3, 4 of 0-4
