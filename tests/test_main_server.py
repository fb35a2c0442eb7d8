"""The main server (spec section 1, revised): one shared set of server-side adapters updated after each client's
batch in a seeded, rotating order; NAA with the server copy as one more holder; server-only layers kept with
their Adam moments; a common initialisation; the clock's figures by hand."""
import dataclasses

import numpy as np
import pytest
import torch

from conftest import preset_fields
from hsplit_nb.adapters import adapter_names, base_weight, lora_layer, read_adapter
from hsplit_nb.aggregation import Aggregator, fedavg, naa, naa_aggregate
from hsplit_nb.clientdata import load_splits
from hsplit_nb.config import ExperimentConfig
from hsplit_nb.experiment import _Run
from hsplit_nb.federation import SERVER_ADAPTER
from hsplit_nb.federation import server as server_module
from hsplit_nb.methods import METHODS

# tiny LLaMA has 4 blocks: c0 at split 1 and c1 at split 3 make layers 1-2 overlap layers, layer 3 server-only
TWO = preset_fields("quick", num_clients=2, budgets=[11_500_000, 11_500_000], split_points=[1, 3], rounds=2,
                    local_steps=3, final_metrics=False)


def _run(method: str, **overrides):
    cfg = ExperimentConfig(**{**TWO, **overrides}, methods=[method])
    run = _Run(cfg, method, load_splits(cfg), None)
    run.fed.start()
    return run


def test_the_shared_server_adapter_steps_once_per_client_per_local_step_in_a_seeded_rotating_order(monkeypatch):
    run = _run("hsplitlora-no-iwi", num_clients=3, budgets=[11_500_000] * 3, split_points=[1, 2, 3], local_steps=4)
    fed = run.fed
    served, optimizers = [], []
    real = server_module.server_update

    def spy(part, smashed, mask, labels, opt):
        served.append(part.split_point)
        optimizers.append(opt)
        return real(part, smashed, mask, labels, opt)

    monkeypatch.setattr(server_module, "server_update", spy)
    fed.begin_round(1)
    fed.run_round(1)
    shared = fed.server_opts[SERVER_ADAPTER]
    assert all(opt is shared for opt in optimizers) and len(optimizers) == 4 * 3
    assert max(s["step"] for s in shared.state.values()) == 4 * 3  # one optimizer step per client per local step
    by_split = {c.split_point: c.name for c in fed.clients}
    order = [by_split[s] for s in served]
    perm = [f"c{k}" for k in np.random.default_rng([0, 7_777]).permutation(3)]
    for step in range(4):
        assert order[3 * step:3 * step + 3] == perm[step % 3:] + perm[:step % 3]
    assert {order[3 * step] for step in range(3)} == {"c0", "c1", "c2"}  # nobody is always first


def test_the_per_client_variant_gives_each_client_its_own_server_copy_and_optimizer(monkeypatch):
    run = _run("hsplitlora-per-client-server")
    fed = run.fed
    optimizers = []
    real = server_module.server_update
    monkeypatch.setattr(server_module, "server_update",
                        lambda part, s, m, l, opt: optimizers.append(opt) or real(part, s, m, l, opt))
    fed.begin_round(1)
    fed.run_round(1)
    assert not fed.replica.has_adapter(SERVER_ADAPTER) and set(fed.server_opts) == {"c0", "c1"}
    assert len({id(o) for o in optimizers}) == 2 and len(optimizers) == 2 * 3
    assert METHODS["hsplitlora-per-client-server"].server.shared is False
    assert all(METHODS[m].server.shared for m in ("hsplitlora", "splitlora", "hsplitlora-no-iwi",
                                                   "hsplitlora-no-armsc", "hsplitlora-no-naa"))


def test_naa_with_the_server_copy_equals_the_weighted_sum_of_every_holders_delta(monkeypatch):
    calls = []

    def spy(adapters, weights):
        calls.append(([None if f is None else type(f)(f.A.double(), f.B.double(), f.scale) for f in adapters],
                      list(weights)))
        return naa_aggregate(adapters, weights)

    monkeypatch.setitem(METHODS, "hsplitlora-no-iwi", dataclasses.replace(
        METHODS["hsplitlora-no-iwi"], aggregator=Aggregator("naa", spy, True)))
    run = _run("hsplitlora-no-iwi", partition="dirichlet")  # unequal data, so the weights tell the holders apart
    fed = run.fed
    n0, n1 = (len(c.indices) for c in fed.clients)
    assert n0 != n1
    fed.begin_round(1)
    fed.run_round(1)
    weights = [w for _, w in calls]
    # layer 0: the devices holding an adapter there; layers 1-2: c1's device copy and the server's copy, which
    # served c0's data there; layer 3: server-only, not aggregated
    c0, c1 = fed.clients
    expected = []
    for m in fed.matrices:
        devices = [len(c.indices) for c in (c0, c1) if c.hosts(m.layer) and c.ranks.get(m.name, 0) > 0]
        if devices:
            expected.append(devices + ([n0] if m.layer >= 1 else []))
    assert weights == expected and [n1, n0] in expected
    for factors, weights in calls:
        stacked = naa(factors, weights)
        p = [w / sum(weights) for w in weights]
        expected = sum(pk * f.scale * f.B @ f.A for pk, f in zip(p, factors))
        torch.testing.assert_close(stacked.delta(), expected, atol=1e-10, rtol=0)


def test_server_only_layers_are_neither_merged_nor_restarted_and_keep_their_adam_moments():
    run = _run("hsplitlora-no-iwi")
    fed = run.fed
    server_only = [n for n in adapter_names(fed.pm, SERVER_ADAPTER) if ".3." in n]
    overlap = [n for n in adapter_names(fed.pm, SERVER_ADAPTER) if ".1." in n]
    assert server_only and overlap
    before = {n: base_weight(fed.pm, n).detach().clone() for n in server_only}
    steps = []
    for r in (1, 2):
        fed.begin_round(r)
        fed.run_round(r)
        for n in server_only:
            torch.testing.assert_close(base_weight(fed.pm, n), before[n], atol=0, rtol=0)  # never merged
            assert read_adapter(fed.pm, n, SERVER_ADAPTER).B.abs().sum() > 0  # still learning, not restarted
            assert n not in fed.touched
        for n in overlap:
            assert read_adapter(fed.pm, n, SERVER_ADAPTER).B.abs().sum() == 0 and n in fed.touched  # merged
        opt = fed.server_opts[SERVER_ADAPTER]
        kept = lora_layer(fed.pm, server_only[0], SERVER_ADAPTER).lora_B[SERVER_ADAPTER].weight
        steps.append(int(opt.state[kept]["step"]))
        assert opt.state[kept]["exp_avg_sq"].abs().sum() > 0
        restarted = lora_layer(fed.pm, overlap[0], SERVER_ADAPTER).lora_B[SERVER_ADAPTER].weight
        assert restarted not in opt.state  # restarted at the merge: fresh moments
    assert steps == [2 * 3, 2 * 2 * 3]  # both clients' batches, every local step, across both rounds


def test_untrained_adapters_of_two_clients_share_a_and_fedavg_of_them_returns_that_adapter():
    run = _run("splitlora", split_points=None)
    fed = run.fed
    name = adapter_names(fed.pm, "c0")[0]
    f0, f1 = read_adapter(fed.pm, name, "c0"), read_adapter(fed.pm, name, "c1")
    torch.testing.assert_close(f0.A, f1.A, atol=0, rtol=0)
    out = fedavg([f0, f1], [3, 5])
    for A, B in out.factors:
        torch.testing.assert_close(A, f0.A, atol=1e-7, rtol=0)
        torch.testing.assert_close(B, f0.B, atol=0, rtol=0)


def test_round_time_of_a_two_client_toy_equals_the_figure_by_hand():
    """Tiny LLaMA (d 32, 4 heads of 8, 2 KV heads, MLP 64, vocab 259), batch 4 x 256, c0 at split 1 and c1 at
    split 3, speeds 1e9 and 2e9 FLOP/s, server 1e10, bandwidth 1e8 B/s, one local step, no IWI."""
    run = _run("hsplitlora-no-iwi", local_steps=1, speeds=[1e9, 2e9], server_speed=1e10, bandwidth=1e8)
    fed = run.fed
    fed.begin_round(1)
    rec = fed.run_round(1)
    bt, T = 4 * 256, 256
    matmul = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64          # q, k, v, o, gate, up, down: 9,216
    fb = 2 * (2 * bt * matmul + 4 * bt * T * 32)                      # forward + backward of one block
    hf = 2 * 2 * bt * 32 * 259                                        # LM head
    b = rec["bytes"]
    step_bytes = {k: b[k]["smashed_up"] + b[k]["grad_down"] for k in ("c0", "c1")}
    assert step_bytes["c0"] == 4 * 256 * 32 * 4 * 2 + 4 * 256 * 8 * 2  # smashed + gradient, mask + labels (int64)
    c0 = 1 * fb / 1e9 + step_bytes["c0"] / 1e8
    c1 = 3 * fb / 2e9 + step_bytes["c1"] / 1e8
    server = ((4 - 1) * fb + hf + (4 - 3) * fb + hf) / 1e10
    boundary = max((b[k]["adapter_up"] + b[k]["adapter_down"]) / 1e8 for k in ("c0", "c1"))
    assert fed.sim_time == pytest.approx(max(c0, c1, server) + boundary, rel=1e-12)


def test_server_adapter_budget_from_the_config_and_the_command_line_sets_the_shared_ranks():
    """Default: the top rank on every server-side matrix; a smaller budget (config field, or `--set` on the command
    line) gives fewer shared server parameters, within the budget (4 copies x 4 bytes per parameter)."""
    from conftest import REPO
    from hsplit_nb.__main__ import _config, _parser

    full = _run("hsplitlora").fed
    top = max(TWO["rank_levels"])
    shapes = [base_weight(full.pm, m).shape for m in full.shared_matrices()]
    on_server_full = full.trainable_params()[1]
    assert on_server_full == sum(top * (d_out + d_in) for d_out, d_in in shapes)
    budget = 16.0 * on_server_full / 4  # room for about a quarter of the default set
    small = _run("hsplitlora", server_adapter_budget=budget).fed
    on_server_small = small.trainable_params()[1]
    assert 0 < on_server_small < on_server_full and 16 * on_server_small <= budget
    args = _parser().parse_args(["run", "--config", str(REPO / "configs" / "quick.yaml"),
                                 "--set", f"server_adapter_budget={budget:g}", "--set", "lr=3e-3"])
    cfg = _config(args)
    assert cfg.server_adapter_budget == float(f"{budget:g}") and cfg.lr == 0.003


def test_per_client_server_copies_take_the_shared_sets_ranks_so_the_ablation_changes_the_schedule_alone():
    """The SFL-V1 variant differs from HSplitLoRA in the server schedule only: each client's server-side copy has
    the ranks the shared set has on those matrices (the server's budget), never ranks cut by the client's budget."""
    from hsplit_nb.adapters import layer_of

    shared = _run("hsplitlora").fed
    per_client = _run("hsplitlora-per-client-server").fed
    shared_ranks = {n: lora_layer(shared.pm, n, SERVER_ADAPTER).r[SERVER_ADAPTER]
                    for n in adapter_names(shared.pm, SERVER_ADAPTER)}
    expected_params = 0
    for c in per_client.clients:
        mine = {n: lora_layer(per_client.pm, n, c.name).r[c.name] for n in adapter_names(per_client.pm, c.name)
                if layer_of(n) >= c.split_point}
        theirs = {n: r for n, r in shared_ranks.items() if layer_of(n) >= c.split_point}
        assert mine == theirs and len(mine) > 0
        expected_params += sum(r * sum(base_weight(shared.pm, n).shape) for n, r in theirs.items())
    assert per_client.trainable_params()[1] == expected_params
