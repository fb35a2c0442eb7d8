"""Experiment configs: JSON/YAML round trips, clear errors before training, the CLI."""
import json

import pandas as pd
import pytest

from conftest import REPO, e2e_dir
from hsplit_nb.__main__ import main
from hsplit_nb.clientdata import load_splits
from hsplit_nb.config import ExperimentConfig
from hsplit_nb.experiment import run_experiment
from hsplit_nb.metrics import e2e_metrics


def test_config_round_trips_through_json_and_yaml(tmp_path):
    cfg = ExperimentConfig(model="tiny-gpt2", budgets=[1e6, 2e6], num_clients=2, budget_unit="bytes",
                           events=[{"type": "budget", "client": "c1", "round": 2, "memory": 3e6}])
    for suffix in (".json", ".yaml"):
        cfg.save(tmp_path / f"c{suffix}")
        assert ExperimentConfig.load(tmp_path / f"c{suffix}") == cfg
    with pytest.raises(ValueError, match=r"unknown config field 'learning_rate'; known fields: model, data"):
        ExperimentConfig.from_dict({"learning_rate": 1})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ExperimentConfig.load(tmp_path / "missing.yaml")


def test_e2e_folder_splits():
    d = e2e_dir()
    splits = load_splits(ExperimentConfig(data=str(d), val_examples=50, eval_mrs=10))
    assert len(splits.val) == 50 and len(splits.test) == 10
    assert not set(splits.val["mr"]) & set(splits.train["mr"])  # validation MRs are held out
    assert splits.test["refs"].map(len).min() >= 1
    assert len(splits.train) + len(set(splits.val["mr"])) > 4000


def test_cli_runs_the_quick_config_on_e2e_data(tmp_path, capsys):
    d = e2e_dir()
    cfg = ExperimentConfig.load(REPO / "configs" / "quick.yaml")
    small = ExperimentConfig(**{**cfg.to_dict(), "rounds": 1, "local_steps": 2, "eval_mrs": 2, "max_new_tokens": 6,
                                "events": []})
    small.save(tmp_path / "c.json")
    out = tmp_path / "out"
    assert main(["run", "--config", str(tmp_path / "c.json"), "--data", str(d), "--methods", "hsplitlora",
                 "splitlora", "--out", str(out)]) == 0
    results = pd.read_csv(out / "results.csv")
    assert set(results["method"]) == {"hsplitlora", "splitlora"} and results["round"].max() == 1
    assert json.loads((out / "config.json").read_text())["data"] == str(d)
    assert set(pd.read_csv(out / "metrics.csv").columns) >= {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    for f in ("ppl_rounds.png", "ppl_time.png", "bytes_per_round.png"):
        assert (out / f).stat().st_size > 1000
    assert "results in" in capsys.readouterr().out


def test_rescore_scores_stored_outputs_again_and_trains_nothing(tmp_path, capsys):
    cfg = ExperimentConfig.load(REPO / "configs" / "quick.yaml").replace(
        rounds=1, local_steps=1, eval_mrs=2, num_beams=1, max_new_tokens=6, events=[])
    out = tmp_path / "out"
    run_experiment(cfg, ["cenlora"], out_dir=out, progress=False)
    metrics = pd.read_csv(out / "metrics.csv")
    expected = e2e_metrics(json.loads(metrics.loc[0, "outputs"]), list(load_splits(cfg).test["refs"]))
    metrics["CIDEr"] = -1.0  # as if scored by an older scorer
    metrics.to_csv(out / "metrics.csv", index=False)
    before = pd.read_csv(out / "results.csv")
    assert main(["rescore", "--out", str(out)]) == 0
    after = pd.read_csv(out / "results.csv")
    assert pd.read_csv(out / "metrics.csv").loc[0, "CIDEr"] == pytest.approx(expected["CIDEr"], abs=1e-12)
    assert after["CIDEr"].iloc[-1] == pytest.approx(expected["CIDEr"], abs=1e-12)
    pd.testing.assert_series_equal(after["val_ppl"], before["val_ppl"])  # nothing trained again
