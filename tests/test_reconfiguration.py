"""A reconfiguration restarts only what changed (spec section 3, revised 2026-12-06): the change computed from
the holders of each matrix, the shared set's weights and Adam moments kept when the server side is unchanged,
reconfigurations.csv; the no-ARMSC ablation with HSplitLoRA's server side; the split-1 control."""
import pandas as pd
import torch

from conftest import preset_fields
from hsplit_nb.adapters import adapter_names, layer_of, lora_layer, read_adapter
from hsplit_nb.clientdata import load_splits
from hsplit_nb.config import ExperimentConfig
from hsplit_nb.experiment import _Run, run_experiment
from hsplit_nb.federation import SERVER_ADAPTER
from hsplit_nb.federation.reconfiguration import plan_change

TWO = preset_fields("quick", num_clients=2, budgets=[11_500_000, 11_500_000], split_points=[1, 3], rounds=2,
                    local_steps=3, iwi_interval=3, final_metrics=False)
NAMES = [f"model.layers.{layer}.self_attn.q_proj" for layer in range(4)]


def _run(method: str, **overrides):
    cfg = ExperimentConfig(**{**TWO, **overrides}, methods=[method])
    run = _Run(cfg, method, load_splits(cfg), None)
    run.fed.start()
    return run


def test_the_change_of_a_replan_is_the_matrices_whose_holders_change():
    q = NAMES
    before = {"c0": (1, {q[0]: 4}), "c1": (3, {q[0]: 4, q[1]: 4, q[2]: 2})}
    server = {q[1]: 16, q[2]: 16, q[3]: 16}
    same = plan_change(q, before, dict(before), server, dict(server))
    assert same.matrices == set() and same.rebuilt == [] and same.server_restarted == same.server_removed == []
    assert same.server_kept == [q[1], q[2], q[3]]
    # c1 raises its rank on q2: q2's holders change, and c1's adapter is rebuilt, so all of c1's matrices restart
    after = {"c0": (1, {q[0]: 4}), "c1": (3, {q[0]: 4, q[1]: 4, q[2]: 4})}
    ch = plan_change(q, before, after, server, dict(server))
    assert ch.rebuilt == ["c1"] and ch.matrices == {q[0], q[1], q[2]}
    assert ch.server_kept == [q[3]] and ch.server_restarted == [q[1], q[2]] and ch.server_removed == []
    # c0 moves to split 2: q1 gains a host; the shallowest split rises, so the shared set leaves block 1
    after = {"c0": (2, {q[0]: 4, q[1]: 2}), "c1": before["c1"]}
    ch = plan_change(q, before, after, server, {q[2]: 16, q[3]: 16})
    assert ch.rebuilt == ["c0"] and ch.matrices == {q[0], q[1]} and ch.server_removed == [q[1]]
    assert ch.server_kept == [q[2], q[3]] and ch.server_restarted == []


def test_a_reconfiguration_with_an_unchanged_server_plan_keeps_the_shared_sets_weights_and_adam_moments():
    """Splits fixed at 1 and 3: the shared set covers blocks 1-3 at the top rank before and after the first
    importance arrives, so it stays: block 3 (server-only) keeps its factors and Adam moments through the
    reconfiguration, only overlap matrices whose device holders changed restart (before 2026-12-06 every firing
    rebuilt the set and dropped its optimizer state)."""
    fed = _run("hsplitlora").fed
    fed.begin_round(1)
    fed.run_round(1)
    assert fed.pending and fed.pending[0].startswith("first importance")
    kept = [n for n in adapter_names(fed.pm, SERVER_ADAPTER) if layer_of(n) == 3]
    opt = fed.server_opts[SERVER_ADAPTER]

    def snapshot():
        out = {}
        for n in kept:
            layer = lora_layer(fed.pm, n, SERVER_ADAPTER)
            for part in (layer.lora_A, layer.lora_B):
                p = part[SERVER_ADAPTER].weight
                out[n, part is layer.lora_A] = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
        return out

    before = snapshot()
    info = fed.begin_round(2)
    assert info["reconfigured"] and fed.server_opts[SERVER_ADAPTER] is opt
    after = snapshot()
    for key, (w, state) in before.items():
        torch.testing.assert_close(after[key][0], w, atol=0, rtol=0)
        for k in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(after[key][1][k], state[k], atol=0, rtol=0)
    server_row = [r for r in fed.reconfigurations if r["round"] == 2 and r["holder"] == "server"][0]
    assert server_row["restarted"].startswith("kept ") and server_row["restarted"].endswith("removed 0")
    assert server_row["cause"].startswith("first importance")


def test_a_server_side_change_restarts_only_the_matrices_that_changed_and_moves_the_kept_moments():
    """A smaller server budget at the replan (a new set of ranks) rebuilds the shared set: the matrices whose rank
    is unchanged keep factors and moments on the new parameters, the others start afresh."""
    fed = _run("hsplitlora-no-iwi").fed
    fed.begin_round(1)
    fed.run_round(1)
    old = {n: lora_layer(fed.pm, n, SERVER_ADAPTER).r[SERVER_ADAPTER] for n in adapter_names(fed.pm, SERVER_ADAPTER)}
    lowered = sorted(n for n in old if layer_of(n) == 3)[:2]
    factors = {n: read_adapter(fed.pm, n, SERVER_ADAPTER) for n in old}
    real = fed.method.ranks.server
    import dataclasses
    ranks = dataclasses.replace(fed.method.ranks, server=lambda x, r, side: {
        **real(x, r, side), **{n: 8 for n in lowered}})
    fed.method = dataclasses.replace(fed.method, ranks=ranks)
    fed.calibrator.pending = ["a test's reason"]
    fed.begin_round(2)
    for n in old:
        f = read_adapter(fed.pm, n, SERVER_ADAPTER)
        if n in lowered:
            assert f.rank == 8 and f.B.abs().sum() == 0
        elif layer_of(n) == 3:  # server-only and unchanged: kept, with its moments on the new parameters
            torch.testing.assert_close(f.B, factors[n].B, atol=0, rtol=0)
            p = lora_layer(fed.pm, n, SERVER_ADAPTER).lora_B[SERVER_ADAPTER].weight
            assert fed.server_opts[SERVER_ADAPTER].state[p]["exp_avg_sq"].abs().sum() > 0


def test_the_no_armsc_ablation_has_hsplitloras_server_side_and_splitlora_its_uniform_rank():
    cfg = dict(split_points=None, budgets=[3_697_000, 11_500_000])  # the weakest just holds the lowest rank
    h, no_armsc, split = (_run(m, **cfg).fed for m in ("hsplitlora", "hsplitlora-no-armsc", "splitlora"))
    assert min(c.split_point for c in h.clients) == min(c.split_point for c in no_armsc.clients) == 1
    assert no_armsc.trainable_params()[1] == h.trainable_params()[1] > split.trainable_params()[1]
    top = max(TWO["rank_levels"])
    assert {lora_layer(no_armsc.pm, n, SERVER_ADAPTER).r[SERVER_ADAPTER]
            for n in adapter_names(no_armsc.pm, SERVER_ADAPTER)} == {top}
    device = {lora_layer(no_armsc.pm, n, c.name).r[c.name] for c in no_armsc.clients
              for n in adapter_names(no_armsc.pm, c.name)}
    assert len(device) == 1 and device != {top}  # one uniform device rank, the weakest client's


def test_the_split_1_control_puts_every_client_at_split_1_with_armscs_ranks():
    fed = _run("hsplitlora-split-1", split_points=None, budgets=[4_500_000, 11_500_000]).fed
    assert [c.split_point for c in fed.clients] == [1, 1]
    assert fed.tracker is not None


def test_every_run_writes_its_reconfigurations(tmp_path):
    """The quick preset's c1 is away in round 2: the boundary replans for the first importance and c1's leaving,
    round 3 for its return; each row names its cause and each client's plan before and after."""
    cfg = ExperimentConfig(**{**preset_fields("quick"), "rounds": 3, "final_metrics": False},
                           events=[{"type": "dropout", "client": "c1", "start": 2, "end": 2}], methods=["hsplitlora"])
    run_experiment(cfg, out_dir=tmp_path, progress=False, figures=False)
    table = pd.read_csv(tmp_path / "reconfigurations.csv")
    assert list(table.columns[:4]) == ["method", "round", "cause", "importance_shift"]
    assert sorted(table["round"].unique()) == [0, 2, 3]
    r2 = table[table["round"] == 2]
    assert "first importance" in r2["cause"].iloc[0] and "left: c1" in r2["cause"].iloc[0]
    assert set(r2["holder"]) == {"c0", "c2", "server"}  # the present clients and the server's set
    assert "returned: c1" in table[table["round"] == 3]["cause"].iloc[0]
    start = table[(table["round"] == 0) & (table["holder"] != "server")]
    assert (start["split_before"] == 0).all() and (start["restarted"] == "rebuilt").all()
    assert (start["adapters_after"] > 0).all()
