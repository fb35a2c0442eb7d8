"""Adapters: peft LoRA with per-matrix ranks, factors read/write, merge invariants."""
import pytest
import torch

from hsplit_nb.adapters import (
    add_adapters, adapter_names, base_weight, candidate_matrices, lora_config, lora_layer, merge_delta,
    read_adapter, reset_adapter, resolve_ranks, restart_adapter, restart_seed, write_adapter,
)
from hsplit_nb.models import tiny_model
from hsplit_nb.split import unwrap


def _random_factors(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for name in adapter_names(model):
        f = read_adapter(model, name)
        write_adapter(model, name, torch.randn(f.A.shape, generator=g) * 0.2, torch.randn(f.B.shape, generator=g) * 0.2)


def test_candidates_from_config_match_the_real_modules(tiny):
    model, _ = tiny
    matrices = candidate_matrices(model.config)
    kinds = {"llama": ["q", "k", "v", "o", "gate", "up", "down"], "gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]}
    assert [m.kind for m in matrices[:len(kinds[model.config.model_type])]] == kinds[model.config.model_type]
    assert len(matrices) == 4 * len(kinds[model.config.model_type])
    for m in matrices:
        w = model.get_submodule(m.name).weight
        stored = (m.d_in, m.d_out) if model.config.model_type == "gpt2" else (m.d_out, m.d_in)
        assert tuple(w.shape) == stored, m.name
        assert m.rank1_cost == m.d_in + m.d_out


def test_resolve_ranks_kinds_names_and_zero():
    model, _ = tiny_model("llama")
    ranks = resolve_ranks(model, {"q": 4, "v": 2, "model.layers.1.self_attn.q_proj": 0,
                                  "model.layers.2.mlp.down_proj": 8})
    assert ranks["model.layers.0.self_attn.q_proj"] == 4
    assert ranks["model.layers.1.self_attn.q_proj"] == 0
    assert ranks["model.layers.3.self_attn.v_proj"] == 2
    assert ranks["model.layers.2.mlp.down_proj"] == 8
    assert ranks["model.layers.0.self_attn.k_proj"] == 0
    assert set(resolve_ranks(model, 3).values()) == {3}


@pytest.mark.parametrize("ranks,match", [({"qq": 2}, "unknown matrix 'qq'"), ({"q": -1}, "non-negative integer"),
                                         ({"q": 1.5}, "non-negative integer"), ({"q": 0}, "every rank is 0")])
def test_bad_ranks_are_clear_errors(ranks, match):
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        lora_config(model, ranks)


def test_per_matrix_ranks_rank_zero_left_out_and_alpha_fixed_across_ranks(family):
    model, _ = tiny_model(family)
    first = "q" if family == "llama" else "c_attn"
    second = "model.layers.1.mlp.down_proj" if family == "llama" else "transformer.h.1.mlp.c_fc"
    zero = "model.layers.2.self_attn.q_proj" if family == "llama" else "transformer.h.2.attn.c_attn"
    pm = add_adapters(model, {first: 2, second: 16, zero: 0})
    names = adapter_names(pm)
    assert zero not in names and second in names and len(names) == 4
    assert read_adapter(pm, second).rank == 16
    assert read_adapter(pm, second).scale == 32 / 16  # the default alpha is 2 x the top rank level (16)
    assert {read_adapter(pm, n).scale for n in names if n != second} == {32 / 2}
    assert {read_adapter(pm, n).rank for n in names if n != second} == {2}


@pytest.mark.parametrize("levels", [(0, 2, 4, 8, 16), (0, 1, 4, 32)])
def test_the_scale_is_alpha_over_r_at_every_rank_level(levels):
    """scale = alpha / r with one alpha for every rank: by default 2 x the top level, or as configured."""
    from hsplit_nb.config import ExperimentConfig

    cfg = ExperimentConfig(rank_levels=list(levels))
    assert cfg.alpha == 2 * max(levels) and ExperimentConfig(lora_alpha=5.0).alpha == 5.0
    model, _ = tiny_model("llama")
    kinds = ["q", "k", "v", "o", "gate", "up", "down"]
    positive = [r for r in levels if r > 0]
    pm = add_adapters(model, {kind: positive[i % len(positive)] for i, kind in enumerate(kinds)}, alpha=cfg.alpha)
    for n in adapter_names(pm):
        f = read_adapter(pm, n)
        assert f.scale == pytest.approx(cfg.alpha / f.rank), n
    assert {read_adapter(pm, n).rank for n in adapter_names(pm)} == set(positive)
    assert all(not p.requires_grad for n, p in pm.named_parameters() if "lora_" not in n)


def test_fresh_adapter_is_the_identity(tiny, batch):
    model, _ = tiny
    with torch.no_grad():
        ref = model(**batch).logits
    pm = add_adapters(model, 8)
    assert all(read_adapter(pm, n).B.abs().sum() == 0 and read_adapter(pm, n).A.abs().sum() > 0
               for n in adapter_names(pm))
    with torch.no_grad():
        torch.testing.assert_close(pm(**batch).logits, ref, atol=0, rtol=0)


def test_delta_matches_peft_and_write_read_round_trip(family):
    model, _ = tiny_model(family)
    pm = add_adapters(model, 4)
    _random_factors(pm)
    for name in adapter_names(pm):
        f = read_adapter(pm, name)
        peft_delta = lora_layer(pm, name).get_delta_weight("default")
        expected = peft_delta.T if family == "gpt2" else peft_delta
        torch.testing.assert_close(f.delta(), expected, atol=1e-6, rtol=0)
    name = adapter_names(pm)[0]
    f = read_adapter(pm, name)
    with pytest.raises(ValueError, match="expected A"):
        write_adapter(pm, name, f.A[:2], f.B[:, :2])


def test_merge_round_trip(tiny, batch):
    """Merging the delta into the frozen weight and zeroing B leaves the output unchanged; -delta undoes it."""
    model, _ = tiny
    pm = add_adapters(model, 4, alpha=8)  # scale 2: random factors of this size keep the logits in fp32 range
    _random_factors(pm)
    with torch.no_grad():
        with_adapters = pm(**batch).logits
    originals = {n: base_weight(pm, n).detach().clone() for n in adapter_names(pm)}
    for name in adapter_names(pm):
        f = read_adapter(pm, name)
        merge_delta(pm, name, f.delta())
        write_adapter(pm, name, f.A, torch.zeros_like(f.B))
    with torch.no_grad():
        merged = pm(**batch).logits
    torch.testing.assert_close(merged, with_adapters, atol=1e-5, rtol=0)
    for name, w in originals.items():
        assert not torch.equal(base_weight(pm, name), w)
    for name in adapter_names(pm):
        g = torch.Generator().manual_seed(0)
        d = torch.randn(read_adapter(pm, name).delta().shape, generator=g)
        before = base_weight(pm, name).detach().clone()
        merge_delta(pm, name, d)
        merge_delta(pm, name, -d)
        torch.testing.assert_close(base_weight(pm, name), before, atol=1e-6, rtol=0)


def test_reset_adapter_restarts_at_the_same_rank(tiny, batch):
    model, _ = tiny
    pm = add_adapters(model, 4)
    with torch.no_grad():
        base = pm(**batch).logits
    _random_factors(pm)
    name = adapter_names(pm)[0]
    old = read_adapter(pm, name)
    for n in adapter_names(pm):
        reset_adapter(pm, n)
    new = read_adapter(pm, name)
    assert new.rank == old.rank and new.B.abs().sum() == 0 and not torch.equal(new.A, old.A)
    with torch.no_grad():
        torch.testing.assert_close(pm(**batch).logits, base, atol=0, rtol=0)


def test_merge_delta_shape_error(family):
    model, _ = tiny_model(family)
    name = candidate_matrices(model)[0].name
    with pytest.raises(ValueError, match="does not fit"):
        merge_delta(model, name, torch.zeros(3, 3))
    assert unwrap(model) is model


def test_restart_adapter_is_keyed_by_its_seed_and_starts_at_zero_delta(tiny):
    model, _ = tiny
    pm = add_adapters(model, 4)
    n = adapter_names(pm)[0]

    seed = restart_seed(0, n, 3)
    assert seed == restart_seed(0, n, 3) and seed != restart_seed(0, n, 4) != restart_seed(1, n, 3)
    assert seed != restart_seed(0, adapter_names(pm)[1], 3)
    restart_adapter(pm, n, "default", seed)
    first = read_adapter(pm, n)
    assert first.B.abs().sum() == 0 and first.delta().abs().sum() == 0 and first.A.abs().sum() > 0
    bound = 1 / first.A.shape[1] ** 0.5  # peft's Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), +)
    assert first.A.abs().max() <= bound
    torch.manual_seed(123)  # the global generator plays no part
    restart_adapter(pm, n, "default", seed)
    torch.testing.assert_close(read_adapter(pm, n).A, first.A, atol=0, rtol=0)


def test_common_initialisation_lower_ranks_take_the_first_rows_of_the_top_rank_draw(tiny):
    """Every adapter on a matrix at one generation starts from the same A, whoever holds it; a rank-r adapter
    takes the first r rows of the top-rank draw."""
    model, _ = tiny
    pm = add_adapters(model, 16, adapter="c0")
    pm.add_adapter("c1", lora_config(model, 16))
    pm.add_adapter("c2", lora_config(model, 4))
    n = adapter_names(pm, "c0")[0]
    for adapter in ("c0", "c1", "c2"):
        restart_adapter(pm, n, adapter, restart_seed(0, n, 7), top_rank=16)
    a0, a1, a2 = (read_adapter(pm, n, a).A for a in ("c0", "c1", "c2"))
    torch.testing.assert_close(a0, a1, atol=0, rtol=0)
    torch.testing.assert_close(a2, a0[:4], atol=0, rtol=0)
