"""IWI: RNGWP against a hand computation, the dynamic beta, the trigger, no gradient state left behind."""
import pytest
import torch

from conftest import padded_batch
from hsplit_nb.adapters import add_adapters, base_weight, candidate_matrices
from hsplit_nb.importance import ImportanceTracker, rngwp_scores
from hsplit_nb.models import tiny_model


def test_rngwp_equals_a_hand_computation(family):
    model, tok = tiny_model(family)  # plain model: every weight requires grad, so backward fills .grad
    batch = padded_batch(tok)
    model(**batch).loss.backward()
    expected = {}
    for m in candidate_matrices(model):
        w = model.get_submodule(m.name).weight
        expected[m.name] = (w * w.grad).abs().sum().item() / (m.d_in + m.d_out)

    peft_model = add_adapters(tiny_model(family)[0], 4)  # same seed, fresh adapters: same loss
    scores = rngwp_scores(peft_model, batch)
    assert scores.keys() == expected.keys()
    for name in expected:
        assert scores[name] == pytest.approx(expected[name], rel=1e-5), name
    if family == "gpt2":  # the fused q|k|v is one matrix with one score
        assert "transformer.h.0.attn.c_attn" in scores and not any("q_proj" in n for n in scores)


def test_split_calibration_gives_the_same_scores(family):
    model, tok = tiny_model(family)
    pm = add_adapters(model, 2)
    batch = padded_batch(tok)
    whole = rngwp_scores(pm, batch)
    for s in (1, 3):
        split = rngwp_scores(pm, batch, split_point=s)
        for n in whole:
            assert split[n] == pytest.approx(whole[n], rel=1e-5, abs=1e-12), (s, n)


def test_calibration_leaves_no_gradient_state(family):
    model, tok = tiny_model(family)
    pm = add_adapters(model, 2)
    pm.train()
    rngwp_scores(pm, padded_batch(tok))
    for m in candidate_matrices(model):
        w = base_weight(pm, m.name)
        assert not w.requires_grad and w.grad is None
    assert all(p.grad is None for p in pm.parameters())
    assert all(p.requires_grad == ("lora_" in n) for n, p in pm.named_parameters())
    assert pm.training


def test_first_calibration_and_beta_schedule():
    tr = ImportanceTracker(["a", "b"], beta_max=0.9)
    rec = tr.update({"a": 3.0, "b": 1.0})
    assert rec["beta"] == 0.0 and rec["fluctuation"] is None
    assert tr.importance() == {"a": 3.0, "b": 1.0}
    assert tr.global_vector() == {"a": 0.75, "b": 0.25}
    rec = tr.update({"a": 1.0, "b": 1.0})  # t = 1: Delta = (2 + 0) / 4 = 0.5
    assert rec["fluctuation"] == pytest.approx(0.5)
    assert rec["beta"] == pytest.approx(0.9 * (1 - 1 / 2) / 1.5)
    beta = rec["beta"]
    assert tr.importance()["a"] == pytest.approx(beta * 3 + (1 - beta) * 1)


def test_large_fluctuation_weighs_new_evidence_more():
    small, large = ImportanceTracker(["a", "b"]), ImportanceTracker(["a", "b"])
    for tr in (small, large):
        tr.update({"a": 1.0, "b": 1.0})
    b_small = small.update({"a": 1.1, "b": 1.0})["beta"]
    b_large = large.update({"a": 5.0, "b": 1.0})["beta"]
    assert b_large < b_small < 0.45
    steady = ImportanceTracker(["a"])
    betas = [steady.update({"a": 2.0})["beta"] for _ in range(10)]
    assert betas[9] == pytest.approx(0.9 * (1 - 1 / 10))  # no fluctuation: beta climbs towards beta_max
    assert all(x < y for x, y in zip(betas, betas[1:]))


def _configured_half_half(delta=0.1):
    tr = ImportanceTracker(["a", "b"], beta_max=0.0, delta=delta)  # beta 0: Ibar follows RNGWP exactly
    tr.update({"a": 1.0, "b": 1.0})
    tr.configured(budgets={"c0": 100, "c1": 200}, present={"c0", "c1"})
    return tr


@pytest.mark.parametrize("eps,fires", [(1e-6, True), (-1e-6, False)])
def test_trigger_fires_just_above_delta_not_just_below(eps, fires):
    tr = _configured_half_half()
    ga = 0.5 + (0.1 + eps) / 2  # ||g - g_config||_1 = 2 |ga - 0.5| = 0.1 + eps
    tr.update({"a": ga, "b": 1 - ga})
    assert tr.shift() == pytest.approx(0.1 + eps, abs=1e-12)
    reasons = tr.trigger(budgets={"c0": 100, "c1": 200}, present={"c0", "c1"})
    assert bool(reasons) is fires
    if fires:
        assert "importance shift" in reasons[0]


def test_trigger_on_budget_change_dropout_and_return():
    tr = _configured_half_half()
    assert ImportanceTracker(["a"]).trigger() == ["no configuration yet"]
    assert tr.trigger(budgets={"c0": 100, "c1": 200}, present={"c0", "c1"}) == []
    assert tr.trigger(budgets={"c0": 100, "c1": 150}) == ["budget changed for c1"]
    assert tr.trigger(present={"c0"}) == ["left: c1"]
    tr.configured(budgets={"c0": 100, "c1": 200}, present={"c0"})
    assert tr.trigger(present={"c0", "c1"}) == ["returned: c1"]


def test_tracker_errors():
    with pytest.raises(ValueError, match=r"beta_max must be in \[0, 1\), got 1.0"):
        ImportanceTracker(["a"], beta_max=1.0)
    with pytest.raises(ValueError, match="delta must be positive"):
        ImportanceTracker(["a"], delta=0)
    tr = ImportanceTracker(["a", "b"])
    with pytest.raises(ValueError, match="scores lack 1 matrices"):
        tr.update({"a": 1.0})
    with pytest.raises(ValueError, match="finite and non-negative"):
        tr.update({"a": -1.0, "b": 1.0})
    with pytest.raises(RuntimeError, match="no calibration yet"):
        tr.global_vector()


@pytest.mark.parametrize("only_deep", [False, True], ids=["adapters-everywhere", "no-adapter-on-the-device"])
def test_a_calibration_riding_on_a_step_scores_as_a_separate_one_and_leaves_the_update_alone(family, only_deep):
    """RNGWP formed by hooks in an ordinary split step's backward equals the separate calibration on the same
    batch (1e-6), and the step's adapter update equals a plain step's (1e-6), also when the device side has no
    adapter at all (the backward must still reach it)."""
    from hsplit_nb.importance import riding, side_matrices
    from hsplit_nb.split import split_model, split_step

    model, tok = tiny_model(family)
    split = 2
    pm = add_adapters(model, {m.name: 2 for m in candidate_matrices(model) if not only_deep or m.layer >= split})
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    pm.train()
    batch = padded_batch(tok)
    expected = rngwp_scores(pm, batch, split_point=split)
    start = {n: p.detach().clone() for n, p in pm.named_parameters()}

    def step(calibrate: bool):
        with torch.no_grad():
            for n, p in pm.named_parameters():
                p.copy_(start[n])
        client, server = split_model(pm, split)
        opts = [torch.optim.AdamW(ps, lr=1e-2) if ps else None for ps in
                ([p for p in part.parameters() if p.requires_grad] for part in (client, server))]
        cli, srv = (side_matrices(model.config, split, side) for side in ("client", "server"))
        with riding(pm, cli if calibrate else [], client.embeddings if calibrate else ()) as c, \
                riding(pm, srv if calibrate else []) as s:
            split_step(client, server, batch, *opts)
        return {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}, {**c, **s}

    plain, none = step(False)
    ridden, scores = step(True)
    assert none == {} and set(scores) == set(expected)
    for n in expected:
        assert scores[n] == pytest.approx(expected[n], rel=1e-6, abs=1e-12), n
    for n in plain:
        torch.testing.assert_close(ridden[n], plain[n], rtol=0, atol=1e-6)
    assert all(not base_weight(pm, m.name).requires_grad for m in candidate_matrices(model))
