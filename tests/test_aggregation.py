"""NAA is exact; FedAvg and zero-padding are off by exactly the cross terms; merge-and-restart is invisible."""
import pytest
import torch

from hsplit_nb.adapters import LoraFactors, add_adapters, adapter_names, base_weight, read_adapter, write_adapter
from hsplit_nb.aggregation import (
    communication, fedavg, flexlora, get_aggregator, hetlora, hetlora_regulariser, load_factors, merge, naa,
    read_all, zero_pad_average,
)
from hsplit_nb.models import tiny_model

D_OUT, D_IN = 12, 10


def _factors(ranks, scales=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    scales = scales or [2.0] * len(ranks)
    return [LoraFactors(torch.randn(r, D_IN, generator=g, dtype=dtype), torch.randn(D_OUT, r, generator=g, dtype=dtype), c)
            if r else None for r, c in zip(ranks, scales)]


def _exact(adapters, weights):
    present = [(f, w) for f, w in zip(adapters, weights) if f is not None and w > 0]
    total = sum(w for _, w in present)
    return sum(w / total * f.scale * f.B @ f.A for f, w in present)


@pytest.mark.parametrize("scales", [None, [2.0, 1.0, 0.5, 4.0, 2.0]])
def test_naa_is_the_exact_weighted_sum(scales):
    adapters = _factors([2, 4, 8, 16, 0], scales)
    weights = [10, 20, 30, 40, 50]
    stacked = naa(adapters, weights)
    assert stacked.rank == 2 + 4 + 8 + 16 and stacked.B.shape == (D_OUT, 30)
    torch.testing.assert_close(stacked.delta(), _exact(adapters, weights), atol=1e-10, rtol=0)


def test_one_adapter_of_weight_one_returns_its_own_delta():
    (f,) = _factors([8])
    torch.testing.assert_close(naa([f], [1.0]).delta(), f.delta(), atol=1e-12, rtol=0)
    torch.testing.assert_close(naa([f], [7]).delta(), f.delta(), atol=1e-12, rtol=0)  # p renormalises to 1


def test_every_client_counts_and_absent_clients_renormalise():
    adapters = _factors([4, 4, 4, 4], seed=1)
    base = naa(adapters, [1, 1, 1, 1]).delta()
    for k in range(4):  # changing any single client changes the aggregate (not only the first)
        bumped = list(adapters)
        bumped[k] = LoraFactors(adapters[k].A, adapters[k].B * 2, adapters[k].scale)
        assert (naa(bumped, [1, 1, 1, 1]).delta() - base).abs().max() > 1e-3, k
    # absent client (None) and weight 0 are left out; the rest renormalise
    absent = naa([adapters[0], None, adapters[2], adapters[3]], [1, 1, 1, 1]).delta()
    zero_w = naa(adapters, [1, 0, 1, 1]).delta()
    torch.testing.assert_close(absent, _exact([adapters[0], adapters[2], adapters[3]], [1, 1, 1]), atol=1e-10, rtol=0)
    torch.testing.assert_close(zero_w, absent, atol=1e-12, rtol=0)
    assert naa([None, None], [1, 1]) is None


def test_fedavg_differs_by_exactly_the_cross_terms():
    adapters = _factors([4, 4, 4], seed=2)
    weights = [1, 2, 3]
    p = [w / 6 for w in weights]
    agg = fedavg(adapters, weights)
    A, B = agg.factors[0]
    assert all(torch.equal(A, a) and torch.equal(B, b) for a, b in agg.factors)
    got = 2.0 * B @ A
    cross = sum(p[j] * p[k] * 2.0 * adapters[j].B @ adapters[k].A for j in range(3) for k in range(3) if j != k)
    diagonal_shortfall = sum((p[k] ** 2 - p[k]) * 2.0 * adapters[k].B @ adapters[k].A for k in range(3))
    torch.testing.assert_close(got - _exact(adapters, weights), cross + diagonal_shortfall, atol=1e-10, rtol=0)
    assert (got - _exact(adapters, weights)).abs().max() > 1e-2
    with pytest.raises(ValueError, match=r"fedavg needs equal ranks, got \[2, 4\]"):
        fedavg(_factors([2, 4]), [1, 1])


def test_zero_padding_differs_by_exactly_the_cross_terms():
    adapters = _factors([2, 4, 8], seed=3)
    weights = [1, 1, 2]
    p = [w / 4 for w in weights]
    A, B = zero_pad_average(adapters, weights)
    assert A.shape == (8, D_IN) and B.shape == (D_OUT, 8)

    def pad(f):
        Ap = torch.zeros(8, D_IN, dtype=f.A.dtype)
        Bp = torch.zeros(D_OUT, 8, dtype=f.B.dtype)
        Ap[: f.rank], Bp[:, : f.rank] = f.A, f.scale * f.B
        return Ap, Bp

    padded = [pad(f) for f in adapters]
    expected_error = sum(p[j] * p[k] * padded[j][1] @ padded[k][0] for j in range(3) for k in range(3) if j != k) + \
        sum((p[k] ** 2 - p[k]) * padded[k][1] @ padded[k][0] for k in range(3))
    torch.testing.assert_close(B @ A - _exact(adapters, weights), expected_error, atol=1e-10, rtol=0)
    assert (B @ A - _exact(adapters, weights)).abs().max() > 1e-2


def test_hetlora_weights_by_update_norm_and_truncates_to_each_rank():
    a, b = _factors([4, 8], seed=4)
    silent = LoraFactors(b.A, torch.zeros_like(b.B), b.scale)  # no update: norm 0, weight 0
    agg = hetlora([a, silent], [1, 1])
    (A0, B0), (A1, B1) = agg.factors
    assert A0.shape == (4, D_IN) and B1.shape == (D_OUT, 8)
    torch.testing.assert_close(A0, a.A, atol=1e-12, rtol=0)
    torch.testing.assert_close(B0, a.B, atol=1e-12, rtol=0)
    torch.testing.assert_close(B1[:, 4:], torch.zeros(D_OUT, 4, dtype=B1.dtype))
    assert hetlora([a, b], [1, 0]).factors[0][0].equal(a.A)  # an absent client stays out


def test_hetlora_regulariser_penalises_the_rank_tail():
    model, _ = tiny_model("llama")
    pm = add_adapters(model, {"q": 4})
    names = adapter_names(pm)
    g = torch.Generator().manual_seed(0)
    for n in names:
        f = read_adapter(pm, n)
        write_adapter(pm, n, torch.randn(f.A.shape, generator=g), torch.randn(f.B.shape, generator=g))
    reg = hetlora_regulariser(pm, gamma=0.5)
    expected = sum(read_adapter(pm, n).B[:, 2:].norm() * read_adapter(pm, n).A[2:].norm() for n in names)
    assert reg.item() == pytest.approx(expected.item(), rel=1e-6)
    reg.backward()
    f = pm.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").lora_A["default"].weight
    assert f.grad[:2].abs().sum() == 0 and f.grad[2:].abs().sum() > 0


def test_flexlora_single_client_reproduces_its_delta():
    (f,) = _factors([4], seed=5)
    A, B = flexlora([f], [1]).factors[0]
    assert A.shape == f.A.shape and B.shape == f.B.shape
    torch.testing.assert_close(f.scale * B @ A, f.delta(), atol=1e-10, rtol=0)
    adapters = _factors([2, 6], seed=6)
    (A2, B2), (A6, B6) = flexlora(adapters, [1, 1]).factors
    full = _exact(adapters, [1, 1])
    assert torch.linalg.matrix_rank(full) == 8
    assert (2.0 * B6 @ A6 - full).norm() < (2.0 * B2 @ A2 - full).norm()  # higher rank, closer to the average


def test_merge_then_restart_leaves_the_output_unchanged(family, batch):
    model, _ = tiny_model(family)
    pm = add_adapters(model, 4)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):  # train a little so the adapters are nonzero and Adam has state
        opt.zero_grad()
        pm(**batch).loss.backward()
        opt.step()
    with torch.no_grad():
        before = pm(**batch).logits
    ranks = {n: read_adapter(pm, n).rank for n in adapter_names(pm)}
    for name in adapter_names(pm):
        merge([pm], name, naa(read_all([pm], name), [1.0]), adapters=[pm], optimizers=[opt])
    with torch.no_grad():
        torch.testing.assert_close(pm(**batch).logits, before, atol=1e-5, rtol=0)
    for name in adapter_names(pm):
        f = read_adapter(pm, name)
        assert f.rank == ranks[name] and f.B.abs().sum() == 0 and f.A.abs().sum() > 0
    assert not opt.state


def test_merge_reaches_every_copy_once():
    a, _ = tiny_model("llama")
    b, _ = tiny_model("llama")
    name = "model.layers.1.self_attn.v_proj"
    before = base_weight(a, name).detach().clone()
    (f,) = _factors([2], dtype=torch.float32)
    stacked = naa([LoraFactors(f.A[:, :32].new_ones(2, 32), f.B[:, :2].new_ones(16, 2), 1.0)], [1])
    merge([a, b, a], name, stacked)  # a listed twice: merged once
    for m in (a, b):
        torch.testing.assert_close(base_weight(m, name), before + stacked.delta())


def test_load_factors_and_errors():
    model, _ = tiny_model("llama")
    pm = add_adapters(model, {"v": 2})
    name = adapter_names(pm)[0]
    A, B = torch.ones(2, 32), torch.ones(16, 2)
    load_factors(pm, name, A, B)
    assert read_adapter(pm, name).A.equal(A)
    with pytest.raises(ValueError, match="non-negative numbers"):
        naa(_factors([2]), [-1])
    with pytest.raises(ValueError, match="got 1 adapters but 2 weights"):
        naa(_factors([2]), [1, 1])
    with pytest.raises(ValueError, match="unknown aggregator 'avg'"):
        get_aggregator("avg")


def test_communication_bytes():
    per = (D_IN + D_OUT) * 4
    naa_bytes = communication("naa", [2, 4, 0], D_IN, D_OUT, on_device=[True, False, True])
    assert naa_bytes == [{"up": 2 * per, "down": 6 * per}, {"up": 0, "down": 0}, {"up": 0, "down": 6 * per}]
    assert communication("fedavg", [4, 4], D_IN, D_OUT, [True, True]) == [{"up": 4 * per, "down": 4 * per}] * 2
    assert communication("hetlora", [2, 8], D_IN, D_OUT, [True, True])[1] == {"up": 8 * per, "down": 8 * per}
