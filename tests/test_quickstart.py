"""The main job on a tiny model: it learns, counts bytes and writes its results."""
import json

import pandas as pd
import pytest

from hsplit_nb.__main__ import main
from hsplit_nb.quickstart import QuickstartConfig, run_split_lora


def test_split_lora_job_learns_and_writes_results(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quickstart", "--model", "tiny-llama", "--steps", "30", "--seq-len", "256", "--split-point", "2",
                 "--ranks", "q=8,v=8,down=2", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    steps = pd.read_csv(out / "steps.csv")
    assert metrics["ppl_after"] < 0.95 * metrics["ppl_before"]
    assert len(steps) == 30 and steps["loss"].tail(5).mean() < steps["loss"].head(5).mean()
    assert metrics["client_trainable_params"] > 0 and metrics["server_trainable_params"] > 0
    assert (steps["bytes_down"] > 0).all() and (steps["bytes_up"] > steps["bytes_down"]).all()
    assert "validation PPL" in capsys.readouterr().out
    assert metrics["config"]["ranks"] == {"q": 8, "v": 8, "down": 2}
    with pytest.raises(SystemExit):
        main(["quickstart", "--ranks", "q:8"])
    assert "ranks must look like q=8,v=8, got 'q:8'" in capsys.readouterr().err


def test_bad_job_settings_are_clear():
    with pytest.raises(ValueError, match="config field 'steps': 0 is not allowed; input should be greater than or equal to 1"):
        QuickstartConfig(model="tiny-llama", steps=0)
    with pytest.raises(ValueError, match=r"split_point must be an integer in \[1, 3\]"):
        run_split_lora(QuickstartConfig(model="tiny-gpt2", split_point=9, seq_len=256, steps=1), progress=False)


def test_notebook_00s_federation_is_a_setting_of_the_comparison_shortened():
    from hsplit_nb.comparison import ComparisonConfig
    from hsplit_nb.config import ConfigError
    from hsplit_nb.quickstart import quickstart_config

    cfg = quickstart_config(True, "b-binding", seed=1, local_steps=None)
    whole = ComparisonConfig.preset("comparison_quick").experiment("b-binding", "hsplitlora", 1)
    assert cfg.budgets == whole.budgets and cfg.seed == 1 and cfg.local_steps == whole.local_steps
    assert (cfg.rounds, cfg.val_examples, cfg.final_metrics) == (1, 8, False)
    assert quickstart_config(True) == quickstart_config(True, "b-binding")
    full = quickstart_config(False, rounds=3)  # the edge comparison's setting, 5-step rounds
    edge = ComparisonConfig.preset("comparison_edge").experiment("edge-b", "hsplitlora", 0)
    assert full.model == "smollm2-135m" and (full.rounds, full.local_steps, full.val_examples) == (3, 5, 32)
    assert full.testbed == "edge" and full.budgets == edge.budgets
    assert quickstart_config(False, "a-paper").testbed is None  # the recorded comparison's settings stay at hand
    with pytest.raises(ConfigError, match=r"config field 'setting': 'b' is not allowed; one of a-paper, b-binding"):
        quickstart_config(True, "b")


def test_initial_plans_give_each_split_methods_configuration_before_any_training():
    """The tiny model in a testbed where the server is slower than the clients: ARMSC spreads the clients over
    the blocks (richer deeper), SplitLoRA's rule puts everyone at the weakest client's split."""
    from hsplit_nb.quickstart import initial_plans, quickstart_config

    cfg = quickstart_config(True, "a-paper", server_speed=2e9, speeds=[1e9, 2e9, 3e9])
    plans = initial_plans(cfg)
    h, s = (plans[plans["method"] == m] for m in ("hsplitlora", "splitlora"))
    assert h["client"].tolist() == s["client"].tolist() == cfg.client_names()
    assert h["split_point"].tolist() == sorted(h["split_point"]) and h["split_point"].nunique() > 1
    assert s["split_point"].nunique() == 1 and (h["device_adapters"] > 0).all()
    assert plans.attrs["n_blocks"] == 4 and (plans["budget_bytes"] > 0).all()
