"""The federation on tiny models: every method learns, NAA with one client is centralised LoRA with merges,
dropouts exclude the absent client, and a stopped run resumes to the same numbers."""
import dataclasses
import re

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import preset_fields
from hsplit_nb.adapters import (
    adapter_names, add_adapters, base_weight, merge_delta, read_adapter, restart_adapter, restart_seed,
)
from hsplit_nb.data import E2EDataset, Collator, load_builtin
from hsplit_nb.config import ExperimentConfig
from hsplit_nb.experiment import run_experiment
from hsplit_nb.federation import SERVER_ADAPTER, Client, federation
from hsplit_nb.methods import METHODS, get_method
from hsplit_nb.models import tiny_model
from hsplit_nb.costs import ClientSpec

QUICK = preset_fields("quick", eval_mrs=3, num_beams=1, max_new_tokens=8, final_metrics=False)


def test_every_method_runs_two_rounds_and_learns():
    methods = [m for m in METHODS if m != "hetlora-strict"]  # no client holds the whole model here: own test
    df = run_experiment(ExperimentConfig(**QUICK, methods=methods), progress=False)
    assert set(df["method"]) == set(methods)
    for name, part in df.groupby("method"):
        part = part.set_index("round")
        assert part.loc[2, "val_ppl"] < part.loc[0, "val_ppl"], name
        assert part.loc[2, "train_loss"] < part.loc[1, "train_loss"], name
        assert part.loc[2, "sim_time_s"] > part.loc[1, "sim_time_s"] > 0, name
    split = df[df["method"] == "hsplitlora"].iloc[-1]
    assert split["bytes_up"] > 0 and split["bytes_down"] > 0
    assert split["trainable_client_params"] > 0 and split["trainable_server_params"] > 0
    cen = df[df["method"] == "cenlora"].iloc[-1]
    assert cen["bytes_up"] == 0 and cen["trainable_client_params"] == 0


def _one_client_federation(seed=0, rounds=2, local_steps=3):
    model, tok = tiny_model("llama")
    data = E2EDataset(load_builtin("train").head(40), tok, 256)
    client = Client("c0", ClientSpec("c0", 11.5e6, speed=1e9), list(range(40)))
    settings = ExperimentConfig(num_clients=1, budgets=[11.5e6], budget_unit="bytes", local_steps=local_steps,
                                batch_size=4, seq_len=256, lr=3e-3, seed=seed, split_points=[2])
    fed = federation(model, tok, get_method("hsplitlora-no-iwi"), [client], data, settings)
    torch.manual_seed(seed)
    fed.start()
    return fed, data, tok


def test_one_client_naa_equals_centralised_lora_with_the_same_merges():
    """One client at split 2: its device layers (0-1) merge and restart every round, the main server's shared
    adapters on the server-only layers (2-3) keep learning with their Adam moments, as one plain LoRA model
    does with the same merges."""
    rounds, steps = 3, 3
    fed, data, tok = _one_client_federation(rounds=rounds, local_steps=steps)
    ranks = {n: r for n, r in fed.clients[0].ranks.items() if int(n.split(".")[2]) < 2}
    server_ranks = {n: 16 for n in adapter_names(fed.pm, SERVER_ADAPTER)}  # the server's default: the top rank
    assert fed.clients[0].split_point == 2 and any(ranks.values())
    for r in range(1, rounds + 1):
        fed.begin_round(r)
        fed.run_round(r)

    # the reference: one unsplit model, plain LoRA steps on the same batches, the same merges and restarts
    model, _ = tiny_model("llama")
    pm = add_adapters(model, {**ranks, **server_ranks})
    generation = 1  # the initial configuration; every aggregation counts one more
    for n in adapter_names(pm):
        restart_adapter(pm, n, "default", restart_seed(0, n, generation), top_rank=16)
    collate = Collator(tok.pad_token_id)
    order_state = {"epoch": 0, "pos": 0}

    def next_batch():
        items = []
        while len(items) < 4:
            order = np.random.default_rng([0, 0, order_state["epoch"]]).permutation(40)
            take = order[order_state["pos"]:order_state["pos"] + 4 - len(items)]
            items += [data[int(i)] for i in take]
            order_state["pos"] += len(take)
            if order_state["pos"] >= 40:
                order_state["epoch"], order_state["pos"] = order_state["epoch"] + 1, 0
        return collate(items)

    device = [n for n in adapter_names(pm) if n in ranks]
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(rounds):
        pm.train()
        for _ in range(steps):
            opt.zero_grad()
            pm(**next_batch()).loss.backward()
            opt.step()
        generation += 1
        for n in device:
            merge_delta(pm, n, read_adapter(pm, n).delta())
            restart_adapter(pm, n, "default", restart_seed(0, n, generation), top_rank=16)
            layer = pm.base_model.model.get_submodule(n)
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                opt.state.pop(p, None)
    assert fed.generation == generation
    for n in adapter_names(pm):
        torch.testing.assert_close(base_weight(fed.pm, n), base_weight(pm, n), atol=1e-5, rtol=0)
        mine = read_adapter(fed.pm, n, "c0" if n in ranks else SERVER_ADAPTER)
        torch.testing.assert_close(mine.A, read_adapter(pm, n).A, atol=1e-5, rtol=0)
        torch.testing.assert_close(mine.B, read_adapter(pm, n).B, atol=1e-5, rtol=0)


def test_dropout_keeps_others_training_and_excludes_the_absent_weight(monkeypatch):
    cfg = ExperimentConfig(**{**QUICK, "rounds": 3}, methods=["hsplitlora-no-iwi"],
                           events=[{"type": "dropout", "client": "c1", "start": 2, "end": 2}])
    seen = []
    from hsplit_nb import aggregation, methods

    real = aggregation.naa_aggregate

    def spy(adapters, weights):
        seen.append(list(weights))
        return real(adapters, weights)

    spied = dataclasses.replace(METHODS["hsplitlora-no-iwi"], aggregator=aggregation.Aggregator("naa", spy, True))
    monkeypatch.setitem(methods.METHODS, "hsplitlora-no-iwi", spied)
    df = run_experiment(cfg, progress=False)
    clients = df.attrs["clients"]
    r2 = clients[clients["round"] == 2].set_index("client")
    assert not r2.loc["c1", "present"] and r2.loc["c1", "smashed_up"] == 0 and r2.loc["c1", "adapter_up"] == 0
    assert r2.loc["c0", "smashed_up"] > 0 and r2.loc["c2", "smashed_up"] > 0
    rows = df.set_index("round")
    assert rows.loc[2, "present"] == 2 and "left: c1" in rows.loc[2, "reasons"]
    assert "returned: c1" in rows.loc[3, "reasons"] and rows.loc[3, "reconfigured"]
    assert clients[(clients["round"] == 3)].set_index("client").loc["c1", "weights_down"] > 0  # catches up
    per_round = len(seen) // 3
    round2 = seen[per_round:2 * per_round]
    assert round2 and all(w[1] == 0 for w in round2 if len(w) == 3)
    assert all(w[1] > 0 for w in seen[:per_round] if len(w) == 3)


def test_resume_after_a_stop_gives_the_same_numbers(tmp_path):
    cfg = ExperimentConfig(**{**QUICK, "rounds": 3, "final_metrics": True}, methods=["hsplitlora", "splitlora"])
    whole = run_experiment(cfg, out_dir=tmp_path / "whole", progress=False)

    class Stop(Exception):
        pass

    def stop_after(method, row):
        if method == "hsplitlora" and row["round"] == 2:
            raise Stop

    with pytest.raises(Stop):
        run_experiment(cfg, out_dir=tmp_path / "cut", progress=False, on_round=stop_after)
    assert (tmp_path / "cut" / "checkpoints" / "hsplitlora.pt").is_file()
    resumed = run_experiment(cfg, out_dir=tmp_path / "cut", progress=False)
    cols = [c for c in whole.columns if c not in ("wall_time_s",)]
    pd.testing.assert_frame_equal(resumed[cols].reset_index(drop=True), whole[cols].reset_index(drop=True))
    m1, m2 = whole.attrs["metrics"], resumed.attrs["metrics"]
    pd.testing.assert_frame_equal(m1.reset_index(drop=True), m2.reset_index(drop=True))
    assert not (tmp_path / "cut" / "checkpoints" / "hsplitlora.pt").exists()
    for f in ("results.csv", "clients.csv", "metrics.csv", "config.json", "ppl_rounds.png", "ppl_time.png",
              "bytes_per_round.png"):
        assert (tmp_path / "cut" / f).is_file(), f
    # a finished run started again does nothing new
    again = run_experiment(cfg, out_dir=tmp_path / "cut", progress=False)
    pd.testing.assert_frame_equal(again[cols].reset_index(drop=True), whole[cols].reset_index(drop=True))
    with pytest.raises(ValueError, match=r"different setting \(lr: 0.003 -> 0.01\)"):
        run_experiment(cfg.replace(lr=1e-2), out_dir=tmp_path / "cut", progress=False)


def test_hetlora_strict_memory_leaves_out_clients_that_cannot_hold_the_model():
    cfg = ExperimentConfig(**{**QUICK, "budgets": [1e6, 2e6, 50e6]}, methods=["hetlora", "hetlora-strict"])
    df = run_experiment(cfg, progress=False)
    clients = df.attrs["clients"]
    strict = clients[clients["method"] == "hetlora-strict"].set_index(["round", "client"])
    assert not strict.loc[(1, "c0"), "present"] and not strict.loc[(2, "c1"), "present"]
    assert strict.loc[(1, "c2"), "present"] and strict.loc[(1, "c2"), "adapter_up"] > 0
    lenient = clients[clients["method"] == "hetlora"]
    assert lenient["present"].all()  # the benefit of the doubt: everyone takes part
    nobody = run_experiment(ExperimentConfig(**{**QUICK, "budgets": [1e6, 2e6, 3e6]}, methods=["hetlora-strict"]),
                            progress=False)
    note = nobody.attrs["metrics"].loc[0, "note"]
    assert nobody.empty and "no client can hold the whole model (largest budget 3.000 MB;" in note
    need = float(re.search(r"the budget each client needs at its rank, with the headroom: .*c2 ([\d.]+) MB", note)[1])
    just = ExperimentConfig(**{**QUICK, "budgets": [1e6, 2e6, need * 1e6 + 1e3], "rounds": 1},
                            methods=["hetlora-strict"])  # the need the note names is enough (to the kB)
    present = run_experiment(just, progress=False).attrs["clients"]["present"].tolist()
    assert present == [False, False, True]
