"""Bad input, as a careless user types it. Each case ends in a clear error that names the field (or file, or
argument), the value and what is allowed, or is accepted where the input was valid (`None` below).

Extend a table in one line: (case, input, pattern the error must match, or None where the input is valid).
"""
import json
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import preset_fields
from hsplit_nb.__main__ import main
from hsplit_nb.adapters import LoraFactors
from hsplit_nb.aggregation import get_aggregator, naa
from hsplit_nb.config import ConfigError, ExperimentConfig
from hsplit_nb.costs import ClientSpec
from hsplit_nb.data import load_builtin, load_e2e
from hsplit_nb.experiment import run_experiment
from hsplit_nb.federation import Diverged
from hsplit_nb.io import atomic_write_json
from hsplit_nb.models import model_config, tiny_model
from hsplit_nb.planner import plan
from hsplit_nb.quickstart import QuickstartConfig, run_split_lora
from hsplit_nb.runfolder import RunFolder, RunFolderError
from hsplit_nb.split import split_model

QUICK = preset_fields("quick", eval_mrs=2, num_beams=1, max_new_tokens=6, final_metrics=False)
DROP = {"type": "dropout", "client": "c1", "start": 1, "end": 1}

# ---- config fields (read when the config is built) -----------------------------------------------------
CONFIG_FIELDS = [
    ("lr as a word", {"lr": "fast"}, r"'lr': 'fast' is not allowed; input should be a valid number"),
    ("lr infinite", {"lr": math.inf}, r"'lr': inf is not allowed; input should be a finite number"),
    ("lr zero", {"lr": 0}, r"'lr': 0 is not allowed; input should be greater than 0"),
    ("lr 1e-3 written as text", {"lr": "1e-3"}, None),
    ("speeds as words", {"speeds": ["fast"] * 3}, r"'speeds\[0\]': 'fast' is not allowed"),
    ("rank levels as one string", {"rank_levels": "0,4,8"}, r"'rank_levels': '0,4,8' is not allowed; input should be a valid list"),
    ("rank levels without 0", {"rank_levels": [2, 4]}, r"'rank_levels': \[2, 4\] is not allowed; distinct"),
    ("budgets as one number", {"budgets": 5000000}, r"'budgets': 5000000 is not allowed; input should be a valid list"),
    ("a negative budget", {"budgets": [1e6, -5.0, 2e6]}, r"'budgets\[1\]': -5.0 is not allowed; input should be greater than 0"),
    ("one budget for three clients", {"budgets": [1e6]}, r"'budgets': \[1000000.0\] is not allowed; one value per client \(3"),
    ("numpy budgets", {"budgets": list(np.array([4.5e6, 8e6, 11.5e6]))}, None),
    ("seed as a word", {"seed": "zero"}, r"'seed': 'zero' is not allowed; input should be a valid integer"),
    ("rounds zero", {"rounds": 0}, r"'rounds': 0 is not allowed; input should be greater than or equal to 1"),
    ("rounds as a boolean", {"rounds": True}, r"'rounds': True is not allowed; a boolean is not a number"),
    ("local steps fractional", {"local_steps": 2.5}, r"'local_steps': 2.5 is not allowed; input should be a valid integer"),
    ("methods as one string", {"methods": "hsplitlora"}, r"'methods': 'hsplitlora' is not allowed; input should be a valid list"),
    ("an unknown method", {"methods": ["hsplitlora", "fedprox"]}, r"unknown method 'fedprox'; choose from hsplitlora"),
    ("no method", {"methods": []}, r"'methods': \[\] is not allowed; list should have at least 1 item"),
    ("events as a mapping", {"events": {"type": "dropout"}}, r"'events': \{'type': 'dropout'\} is not allowed; input should be a valid list"),
    ("an unknown event type", {"events": [{"type": "warp", "client": 0}]}, r"'events\[0\]'.*does not match any of the expected tags: 'dropout', 'budget'"),
    ("an event without its round", {"events": [{"type": "budget", "client": 0, "memory": 1e6}]}, r"'events\[0\]\.round' is missing"),
    ("an event for a client that does not exist", {"events": [{**DROP, "client": "c7"}]}, r"'events\[0\]\.client': 'c7' is not allowed; one of \['c0', 'c1', 'c2'\]"),
    ("an event past the last round", {"events": [{**DROP, "end": 5}]}, r"'events\[0\]\.end': 5 is not allowed; a round in 1\.\.2 \(rounds\)"),
    ("a budget event past the last round", {"events": [{"type": "budget", "client": 0, "round": 9, "memory": 5e6}]}, r"'events\[0\]\.round': 9 is not allowed; a round in 1\.\.2"),
    ("a dropout ending before it starts", {"events": [{**DROP, "start": 2, "end": 1}]}, r"'events\[0\]\.end': 1 is not allowed; a round >= start \(2\)"),
    ("every client away in a round", {"events": [{**DROP, "client": k} for k in range(3)]}, r"every client drops out in round 1; at least one client must be present"),
    ("delta no shift can reach", {"delta": 5.0}, r"'delta': 5.0 is not allowed; a number in \(0, 2\): the IWI trigger compares an L1 shift"),
    ("gamma 1", {"gamma": 1.0}, r"'gamma': 1.0 is not allowed; input should be less than 1"),
    ("Dirichlet alpha 0", {"dirichlet_alpha": 0}, r"'dirichlet_alpha': 0 is not allowed; input should be greater than 0"),
    ("an unknown partition", {"partition": "zipf"}, r"'partition': 'zipf' is not allowed; input should be 'iid' or 'dirichlet'"),
    ("a device torch does not know", {"device": "tpu"}, r"'device': 'tpu' is not allowed; a torch device such as 'cpu'"),
    ("an empty model name", {"model": ""}, r"'model': '' is not allowed; string should have at least 1 character"),
    ("final_metrics as a word", {"final_metrics": "yes"}, r"'final_metrics': 'yes' is not allowed; input should be a valid boolean"),
    ("a misspelt field", {"learning_rate": 1e-3}, r"unknown config field 'learning_rate'; known fields: model, data"),
]


@pytest.mark.parametrize("fields,match", [c[1:] for c in CONFIG_FIELDS], ids=[c[0] for c in CONFIG_FIELDS])
def test_config_fields(fields, match):
    if match is None:
        assert ExperimentConfig(**{**QUICK, **fields}).model == QUICK["model"]
        return
    with pytest.raises(ConfigError, match=match) as info:
        ExperimentConfig(**{**QUICK, **fields})
    assert "\n" not in str(info.value), "one line per wrong field"


# ---- config files ------------------------------------------------------------------------------------
QUICK_YAML = "model: tiny-llama\nnum_clients: 2\nbudget_unit: bytes\n"
CONFIG_FILES = [
    ("YAML numbers without a dot", "c.yaml", QUICK_YAML + "lr: 1e-3\nbudgets: [4.5e6, 8e6]\n", None),
    ("a duplicate YAML key", "c.yaml", QUICK_YAML + "budgets: [4.5e6, 8e6]\nlr: 0.1\nlr: 0.2\n", r"c\.yaml: duplicate key 'lr' \(line 6\)"),
    ("a duplicate JSON key", "c.json", '{"lr": 0.1, "lr": 0.2}', r"c\.json: duplicate key\(s\) \['lr'\]"),
    ("a binary file", "c.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"c\.yaml is not UTF-8 text"),
    ("Latin-1 text", "c.yaml", "model: caf\u00e9\n".encode("latin-1"), r"c\.yaml is not UTF-8 text \(byte 10"),
    ("a JSON syntax error", "c.json", '{"lr": 0.1,}', r"c\.json is not valid JSON: .*line 1 column 12"),
    ("a YAML syntax error", "c.yaml", "budgets: [1, 2\n", r"c\.yaml is not valid YAML"),
    ("a list instead of a mapping", "c.yaml", "- lr\n- 0.1\n", r"c\.yaml: expected a mapping of fields, got list"),
    ("a wrong field in a file", "c.yaml", QUICK_YAML + "budgets: [4.5e6, 8e6]\nlr: fast\n", r"c\.yaml: config field 'lr': 'fast' is not allowed"),
]


@pytest.mark.parametrize("name,content,match", [c[1:] for c in CONFIG_FILES], ids=[c[0] for c in CONFIG_FILES])
def test_config_files(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if match is None:
        cfg = ExperimentConfig.load(path)
        assert cfg.lr == 1e-3 and cfg.budgets == [4.5e6, 8e6]
        return
    with pytest.raises(ValueError, match=match):
        ExperimentConfig.load(path)


# ---- checks before training that need the model, the data or the machine (validate) -------------------------
AT_THE_DOOR = [
    ("a device this machine lacks", {"device": "cuda:99"}, r"'device': 'cuda:99' is not allowed; 'cpu'"),
    ("a budget below the smallest split", {"budgets": [1e3, 8e6, 11.5e6]}, r"'budgets\[0\]': 1000.0 is not allowed; at least \d+ bytes: the smallest split configuration"),
    ("a budget event too small for any split", {"events": [{"type": "budget", "client": "c2", "round": 2, "memory": 2e3}]}, r"'events\[0\]\.memory': 2000.0 is not allowed; at least .*; it is client c2's budget from round 2"),
    ("a split point past the model", {"split_points": [1, 9, 2]}, r"'split_points': 9 is not allowed; integers in \[1, 3\] for 'tiny-llama' \(4 blocks\)"),
    ("a data folder that does not exist", {"data": "/no/such/folder"}, r"'data': '/no/such/folder' is not allowed; 'builtin' or an existing folder"),
    ("a model name with a typo", {"model": "smolm2-135m"}, r"could not load model 'smolm2-135m': it is not a known name \('smollm2-135m', 'tiny-llama', 'tiny-gpt2'\)"),
]


@pytest.mark.parametrize("fields,match", [c[1:] for c in AT_THE_DOOR], ids=[c[0] for c in AT_THE_DOOR])
def test_checks_before_training_leave_no_folder_behind(tmp_path, fields, match):
    cfg = ExperimentConfig(**{**QUICK, **fields}, methods=["hsplitlora"])
    start = time.perf_counter()
    with pytest.raises(ConfigError if "load model" not in match else ValueError, match=match):
        run_experiment(cfg, out_dir=tmp_path / "out", progress=False)
    assert time.perf_counter() - start < 5, "refused before any training (and without waiting for the hub)"
    assert not (tmp_path / "out").exists()


# ---- data files ------------------------------------------------------------------------------------------
GOOD_ROW = 'mr,ref\n"name[A], area[riverside]",A is by the river.\n'
DATA_FILES = [
    ("a data file in Latin-1", GOOD_ROW.replace("river.", "caf\u00e9.").encode("latin-1"), r"devset\.csv is not UTF-8 text"),
    ("a binary data file", b"PK\x03\x04\x14\x00\x00\x00\x08\x00", r"devset\.csv is not UTF-8 text|devset\.csv holds NUL bytes"),
    ("a CSV with the wrong columns", b"meaning,text\na,b\n", r"devset\.csv: missing column\(s\) \['mr', 'ref'\]"),
    ("an empty data file", b"", r"devset\.csv: the file is empty"),
    ("a broken MR", b'mr,ref\n"name[A",x\n', r"devset\.csv, row 2:"),
    ("a good file", GOOD_ROW.encode(), None),
]


@pytest.mark.parametrize("content,match", [c[1:] for c in DATA_FILES], ids=[c[0] for c in DATA_FILES])
def test_data_files(tmp_path, content, match):
    path = tmp_path / "devset.csv"
    path.write_bytes(content)
    if match is None:
        assert load_e2e(path)["ref"].tolist() == ["A is by the river."]
        return
    with pytest.raises(ValueError, match=match):
        load_e2e(path)


# ---- the engine's own doors: planner, NAA, split, client specs ------------------------------------------------
def _factors(r, d_in=5, d_out=4, fill=None):
    A, B = torch.randn(r, d_in, dtype=torch.float64), torch.randn(d_out, r, dtype=torch.float64)
    if fill is not None:
        A[0, 0] = fill
    return LoraFactors(A, B, 2.0)


CONFIG = tiny_model("llama")[0].config
API = [
    ("plan given numbers", lambda: plan(CONFIG, [4.5e6, 8e6]), r"clients\[0\] is 4500000.0; plan takes ClientSpec"),
    ("plan with batch 0", lambda: plan(CONFIG, [ClientSpec("a", 5e6)], batch_size=0), r"batch_size 0 is not allowed; a positive integer"),
    ("plan with a negative sequence", lambda: plan(CONFIG, [ClientSpec("a", 5e6)], seq_len=-1), r"seq_len -1 is not allowed"),
    ("plan with a numpy batch size", lambda: plan(CONFIG, [ClientSpec("a", 5e6)], batch_size=np.int64(4)), None),
    ("a budget as text", lambda: ClientSpec("c0", "5e6"), r"client 'c0': memory '5e6' is not allowed; a positive number of bytes"),
    ("NAA with an A that does not fit its B", lambda: naa([_factors(2), LoraFactors(torch.randn(3, 5), torch.randn(4, 2), 1.0)], [1, 1]), r"holder 1: A \(3, 5\) and B \(4, 2\) are not r x d_in and d_out x r"),
    ("NAA over matrices of different shapes", lambda: naa([_factors(2), _factors(2, d_in=6)], [1, 1]), r"holder 1: d_out x d_in is 4 x 6, the other holders' 4 x 5"),
    ("NAA with NaN factors", lambda: naa([_factors(2), _factors(2, fill=math.nan)], [1, 1]), r"holder 1: its factors or scale are not finite"),
    ("NAA with an infinite weight", lambda: naa([_factors(2), _factors(2)], [1, math.inf]), r"holder 1: weight inf is not allowed"),
    ("NAA with one weight too few", lambda: naa([_factors(2), _factors(2)], [1]), r"got 2 adapters but 1 weights"),
    ("NAA naming matrix and client", lambda: get_aggregator("naa")([_factors(2), _factors(2, d_in=6)], [1, 1], ["c0", "c1"], "model.layers.0.self_attn.q_proj"), r"naa on model\.layers\.0\.self_attn\.q_proj, c1: d_out x d_in"),
    ("a numpy split point", lambda: split_model(tiny_model("llama")[0], np.int64(2)), None),
    ("a fractional split point", lambda: split_model(tiny_model("llama")[0], 2.5), r"split_point must be an integer in \[1, 3\] for a 4-block model, got 2\.5"),
    ("smashed data of the wrong width", lambda: split_model(tiny_model("llama")[0], 2)[1](torch.zeros(2, 5, 7)), r"smashed data must have shape \(batch, seq, 32\) at split point 2, got \(2, 5, 7\)"),
    ("a mask that does not fit the batch", lambda: split_model(tiny_model("llama")[0], 2)[0](torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4)), r"attention_mask must have shape \(2, 5\)"),
    ("float token ids", lambda: split_model(tiny_model("gpt2")[0], 2)[0](torch.zeros(2, 5)), r"input_ids must be integer token ids of shape \(batch, seq\), got torch.float32 \(2, 5\)"),
    ("a quickstart with no steps", lambda: QuickstartConfig(steps=0), r"'steps': 0 is not allowed; input should be greater than or equal to 1"),
    ("an unknown model, refused at once", lambda: model_config("no-such-org/no-such-model"), r"could not load model 'no-such-org/no-such-model': it is not a known name"),
]


@pytest.mark.parametrize("call,match", [c[1:] for c in API], ids=[c[0] for c in API])
def test_api_checks_its_inputs(call, match):
    if match is None:
        call()
        return
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        call()
    assert time.perf_counter() - start < 5


# ---- the command line: one line per error ----------------------------------------------------------------
CLI = [
    ("a config that does not exist", ["run", "--config", "{tmp}/none.yaml"], r"^error: config file .*none\.yaml does not exist \[traceback: .*\]$"),
    ("a wrong field", ["run", "--config", "{tmp}/bad.yaml"], r"^error: .*bad\.yaml: config field 'lr': 'fast' is not allowed"),
    ("--out pointing at a file", ["run", "--config", "{tmp}/good.yaml", "--out", "{tmp}/good.yaml"], r"^error: output folder .*good\.yaml is a file; choose a folder \(--out\)"),
    ("plan-paper with batch 0", ["plan-paper", "--batch-size", "0"], r"argument --batch-size: '0' is not allowed; a positive integer"),
    ("an empty --data", ["run", "--config", "{tmp}/good.yaml", "--data", ""], r"argument --data: '' is not allowed; 'builtin' or a folder"),
    ("quickstart with a negative sequence", ["quickstart", "--seq-len", "-1"], r"argument --seq-len: '-1' is not allowed"),
    ("--set without a value", ["run", "--config", "{tmp}/good.yaml", "--set", "lr"], r"argument --set: 'lr' is not allowed; FIELD=VALUE"),
    ("--set of an unknown field", ["run", "--config", "{tmp}/good.yaml", "--set", "speed=3"], r"^error: unknown config field 'speed'; known fields: model"),
    ("--set of a wrong value", ["run", "--config", "{tmp}/good.yaml", "--set", "server_adapter_budget=-1"], r"^error: config field 'server_adapter_budget': -1 is not allowed; input should be greater than or equal to 0"),
    ("compare with an unknown setting", ["compare", "--settings", "z", "--report-only"], r"^error: config field 'settings': 'z' is not allowed; one of a-paper, b-binding, c-homogeneous"),
]


@pytest.mark.parametrize("argv,match", [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_cli_prints_one_line_per_error(tmp_path, capsys, argv, match):
    (tmp_path / "bad.yaml").write_text(QUICK_YAML + "budgets: [4.5e6, 8e6]\nlr: fast\n")
    (tmp_path / "good.yaml").write_text(QUICK_YAML + "budgets: [4.5e6, 8e6]\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own usage error (one line after the usage)
        rc = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and re.search(match, err[-1]), err
    assert len([line for line in err if "error" in line]) == 1 and not any("Traceback" in line for line in err)


def test_cli_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["run", "--config", str(tmp_path / "none.yaml"), "--debug"])


# ---- run folders ---------------------------------------------------------------------------------------------
def _e2e_folder(path, dev_rows=None):
    path.mkdir(exist_ok=True)
    dev = load_builtin("dev") if dev_rows is None else load_builtin("dev").head(dev_rows)
    dev.to_csv(path / "devset.csv", index=False)
    load_builtin("test").to_csv(path / "testset_w_refs.csv", index=False)
    return path


class _Stop(Exception):
    pass


def _stop_after_round_1(method, row):
    if row["round"] == 1:
        raise _Stop


def test_a_resume_with_changed_data_is_refused_naming_the_file(tmp_path):
    data = _e2e_folder(tmp_path / "e2e")
    cfg = ExperimentConfig(**{**QUICK, "data": str(data)}, methods=["hsplitlora-no-iwi"])
    with pytest.raises(_Stop):
        run_experiment(cfg, out_dir=tmp_path / "out", progress=False, on_round=_stop_after_round_1)
    assert (tmp_path / "out" / "checkpoints" / "hsplitlora-no-iwi.pt").is_file()
    copy = shutil.copytree(data, tmp_path / "elsewhere")  # the same files under another path resume
    assert run_experiment(cfg.replace(data=str(copy)), out_dir=tmp_path / "out", progress=False)["round"].max() == 2
    _e2e_folder(data, dev_rows=40)
    with pytest.raises(RunFolderError, match=r"different setting \(data: '.*elsewhere' -> '.*e2e'; data file devset\.csv changed\)"):
        run_experiment(cfg, out_dir=tmp_path / "out", progress=False)
    with pytest.raises(RunFolderError, match=r"different setting \(data: .*; lr: 0\.003 -> 0\.01; data file devset\.csv changed\)"):
        run_experiment(cfg.replace(lr=0.01), out_dir=tmp_path / "out", progress=False)


def test_results_without_config_json_are_refused_and_a_folder_without_results_is_reused(tmp_path):
    cfg = ExperimentConfig(**{**QUICK, "rounds": 1}, methods=["hsplitlora-no-iwi"])
    out = tmp_path / "out"
    run_experiment(cfg, out_dir=out, progress=False)
    (out / "config.json").unlink()
    with pytest.raises(RunFolderError, match="holds results but no config.json"):
        run_experiment(cfg.replace(lr=0.01), out_dir=out, progress=False)
    # a folder whose start failed (no results, a stale config.json) takes the corrected config
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(cfg.replace(lr=0.5).to_dict()))
    df = run_experiment(cfg.replace(methods=["cenlora"]), out_dir=empty, progress=False)
    assert set(df["method"]) == {"cenlora"} and json.loads((empty / "config.json").read_text())["lr"] == 0.003



def test_an_output_folder_deleted_mid_run_is_written_whole_again_and_resumes(tmp_path):
    """The folder vanishes after round 1 (a user's rm -r): round 2 writes it again with its config.json, every
    row so far and a checkpoint, so the same command finds the run finished, with the uninterrupted numbers."""
    cfg = ExperimentConfig(**{**QUICK, "rounds": 2, "final_metrics": False}, methods=["hsplitlora-no-iwi"])
    out = tmp_path / "out"

    def vanish(method, row):
        if row["round"] == 1:
            shutil.rmtree(out)

    df = run_experiment(cfg, out_dir=out, progress=False, on_round=vanish, figures=False)
    assert (out / "config.json").is_file() and (out / "fingerprint.json").is_file()
    again = run_experiment(cfg, out_dir=out, progress=False, figures=False)
    whole = run_experiment(cfg, out_dir=tmp_path / "whole", progress=False, figures=False)
    cols = ["round", "val_ppl", "train_loss", "sim_time_s", "bytes_up"]
    pd.testing.assert_frame_equal(again[cols], whole[cols], check_dtype=False)
    pd.testing.assert_frame_equal(df[cols], whole[cols], check_dtype=False)

@pytest.mark.parametrize("damage,match", [
    (lambda out: (out / "results.csv").write_bytes(b"\x00\x01garbage\xff"), r"results\.csv cannot be read as results"),
    (lambda out: (out / "results.csv").write_text("a,b\n1,2\n"), r"results\.csv does not hold results"),
    (lambda out: (out / "checkpoints" / "hsplitlora-no-iwi.pt").write_bytes(
        (out / "checkpoints" / "hsplitlora-no-iwi.pt").read_bytes()[:500]),
     r"checkpoint .*hsplitlora-no-iwi\.pt cannot be read .*; delete it to start hsplitlora-no-iwi again"),
], ids=["a garbage results.csv", "a results.csv of something else", "a truncated checkpoint"])
def test_damaged_run_folders_are_named(tmp_path, damage, match):
    cfg = ExperimentConfig(**QUICK, methods=["hsplitlora-no-iwi"])
    out = tmp_path / "out"
    with pytest.raises(_Stop):
        run_experiment(cfg, out_dir=out, progress=False, on_round=_stop_after_round_1)
    damage(out)
    with pytest.raises(RunFolderError, match=match):
        run_experiment(cfg, out_dir=out, progress=False)


# ---- divergence ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["hsplitlora", "hsplitlora-no-iwi", "cenlora"])
def test_divergence_stops_the_run_cleanly(tmp_path, method):
    cfg = ExperimentConfig(**{**QUICK, "lr": 1e6, "final_metrics": True}, methods=[method])
    out = tmp_path / "out"
    with pytest.raises(Diverged, match=rf"^{method} diverged in round \d+(, local step \d+)?(, client c\d)?: .* is "
                                       r"(nan|inf|-inf)\. The likely cause is the learning rate \(1e\+06\)"):
        run_experiment(cfg, out_dir=out, progress=False)
    results = pd.read_csv(out / "results.csv") if (out / "results.csv").is_file() else pd.DataFrame()
    assert results.empty or np.isfinite(results["val_ppl"]).all()
    assert not list(out.glob("*.png")), "no figure from a diverged run"
    assert RunFolder(out, cfg).read()[2] == [], "no BLEU of a diverged model"
    for ckpt in (out / "checkpoints").glob("*.pt"):  # the resume point is the last finite round
        state = torch.load(ckpt, weights_only=False)
        assert all(math.isfinite(r["val_ppl"]) for r in state["rows"])


def test_quickstart_divergence_writes_no_json(tmp_path):
    with pytest.raises(Diverged, match=r"quickstart diverged (at step \d+: the training loss|: the validation perplexity "
                                      r"after training) is (nan|inf)"):
        run_split_lora(QuickstartConfig(model="tiny-llama", split_point=2, steps=20, lr=1e6, eval_examples=8,
                                        seq_len=256, batch_size=4), tmp_path, progress=False)
    assert not (tmp_path / "metrics.json").exists()
    atomic_write_json(tmp_path / "m.json", {"ppl": math.nan, "x": [math.inf, 1.0]})
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == \
        {"ppl": None, "x": [None, 1.0]}


# ---- one writer per folder, and checkpoints that belong to the run (issue 25) -------------------------------
def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_gone(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from hsplit_nb.io import FolderLock, FolderLocked

    cfg = ExperimentConfig(**{**QUICK, "rounds": 1}, methods=["hsplitlora-no-iwi"])
    with FolderLock(tmp_path / "out"):
        (tmp_path / "out" / "keep").write_text("")  # a folder in use is not removed when its lock goes
        with pytest.raises(FolderLocked, match=rf"output folder .*out is in use by pid {os.getpid()} \("):
            run_experiment(cfg, out_dir=tmp_path / "out", progress=False)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from hsplit_nb.io import FolderLock; "
                               f"FolderLock({str(tmp_path / 'held')!r}).__enter__(); print('held', flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FolderLocked, match=rf"in use by pid {holder.pid} "):
        run_experiment(cfg, out_dir=tmp_path / "held", progress=False)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert run_experiment(cfg, out_dir=tmp_path / "held", progress=False)["round"].max() == 1  # the kernel let go
    assert not (tmp_path / "held" / ".lock").exists() or (tmp_path / "held" / "results.csv").is_file()


def test_a_checkpoint_in_an_older_state_format_is_refused_naming_it(tmp_path):
    """A checkpoint written before the main server's state became its parts' states cannot be resumed by this
    engine: refused by name before anything is read into the server."""
    cfg = ExperimentConfig(**QUICK, methods=["hsplitlora-no-iwi"])
    with pytest.raises(_Stop):
        run_experiment(cfg, out_dir=tmp_path / "out", progress=False, on_round=_stop_after_round_1)
    path = tmp_path / "out" / "checkpoints" / "hsplitlora-no-iwi.pt"
    saved = torch.load(path, weights_only=False)
    del saved["format"]
    torch.save(saved, path)
    with pytest.raises(RunFolderError, match=r"hsplitlora-no-iwi\.pt holds state format 1, written by an older "
                                             r"engine; this one reads format 2"):
        run_experiment(cfg, out_dir=tmp_path / "out", progress=False)

def test_a_checkpoint_of_another_method_is_refused(tmp_path):
    cfg = ExperimentConfig(**QUICK, methods=["hsplitlora-no-iwi"])
    with pytest.raises(_Stop):
        run_experiment(cfg, out_dir=tmp_path / "out", progress=False, on_round=_stop_after_round_1)
    ckpt = tmp_path / "out" / "checkpoints"
    (ckpt / "hsplitlora-no-iwi.pt").rename(ckpt / "splitlora.pt")
    with pytest.raises(RunFolderError, match=r"splitlora\.pt belongs to method 'hsplitlora-no-iwi', not 'splitlora'"):
        run_experiment(cfg, methods=["splitlora"], out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "results.csv").is_file() or "splitlora" not in \
        set(pd.read_csv(tmp_path / "out" / "results.csv")["method"])


def test_a_misspelt_notebook_parameter_is_refused_naming_the_defined_ones():
    """papermill's `-p qiuck 1` injects a name the notebook never reads, which silently ran the defaults."""
    from hsplit_nb.notebook import check_parameters

    namespace = {"quick": None, "qiuck": 1, "start": print, "In": [], "Out": {}, "_i1": "x"}
    with pytest.raises(ValueError, match=r"notebook 02_iwi: 'qiuck' is not one of its parameters; it defines "
                                         r"batch_size, beta_max, calibrate_every, delta, lr, model, out_dir"):
        check_parameters("02_iwi", namespace)
    check_parameters("02_iwi", {"quick": 1, "steps": 3, "beta_max": 0.5, "In": [], "start": print})


@pytest.mark.parametrize("notebook", sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb")),
                         ids=lambda p: p.stem)
def test_papermill_reads_every_parameter_of_every_notebook_without_a_warning(notebook, caplog):
    """papermill parses each parameters cell line by line (a line with two '=' is skipped with a warning, on every
    run): it must find exactly the names the cell assigns."""
    import json
    import logging

    from papermill.translators import PythonTranslator

    from hsplit_nb.notebook import parameter_names

    cell = next(c for c in json.loads(notebook.read_text())["cells"]
                if "parameters" in c.get("metadata", {}).get("tags", []))
    with caplog.at_level(logging.WARNING, logger="papermill"):
        found = {p.name for p in PythonTranslator.inspect({"source": "".join(cell["source"])})}
    assert caplog.records == [] and found == parameter_names(notebook)


def test_sigterm_during_a_write_leaves_no_temporary_file(tmp_path):
    """A real process killed (SIGTERM, as the command line handles it) while an atomic write is in progress: the
    temporary `.NAME.<random>` file is removed and the target is the old file or none, never half of one."""
    import signal
    import subprocess
    import sys

    child = ("import sys\nfrom hsplit_nb.__main__ import interrupt_on_signals\nfrom hsplit_nb.io import "
             "atomic_write_bytes\ninterrupt_on_signals()\ndata = b'x' * 300_000_000\n"
             "while True:\n    atomic_write_bytes(sys.argv[1], data)\n")
    target = tmp_path / "big.bin"
    proc = subprocess.Popen([sys.executable, "-c", child, str(target)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".big.bin.*")):
        time.sleep(0.005)
    assert list(tmp_path.glob(".big.bin.*")), "the child never started a write"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert list(tmp_path.glob(".big.bin.*")) == []
    assert not target.exists() or target.stat().st_size == 300_000_000


def test_ctrl_c_during_the_final_metrics_exits_at_once_and_the_restart_gives_the_same_results(tmp_path):
    """A real `python -m hsplit_nb run`: SIGINT once its last round is written, while it computes the final
    metrics, ends it within 10 s with the resume hint (exit 130); the same command then finishes, and its tables
    equal an uninterrupted run's."""
    import signal
    import subprocess
    import sys

    cfg = tmp_path / "c.yaml"
    fields = {**QUICK, "rounds": 1, "local_steps": 2, "eval_mrs": 6, "final_metrics": True, "num_beams": 2,
              "max_new_tokens": 20, "methods": ["hsplitlora-no-iwi"]}
    cfg.write_text(json.dumps(fields))
    command = [sys.executable, "-m", "hsplit_nb", "run", "--config", str(cfg), "--out"]
    proc = subprocess.Popen(command + [str(tmp_path / "out")], stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL)
    results = tmp_path / "out" / "results.csv"
    while not (results.is_file() and pd.read_csv(results)["round"].max() == 1):  # training done: metrics next
        assert proc.poll() is None, "the run ended before its final metrics"
        time.sleep(0.05)
    metrics = tmp_path / "out" / "metrics.csv"
    assert not metrics.is_file() or "hsplitlora-no-iwi" not in metrics.read_text()
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and time.time() - sent < 10
    assert "interrupted; start the same command again" in rest
    assert subprocess.run(command + [str(tmp_path / "out")], capture_output=True).returncode == 0
    assert subprocess.run(command + [str(tmp_path / "whole")], capture_output=True).returncode == 0
    for name in ("results.csv", "metrics.csv"):
        again, whole = (pd.read_csv(tmp_path / d / name) for d in ("out", "whole"))
        cols = [c for c in whole.columns if "wall" not in c]
        pd.testing.assert_frame_equal(again[cols], whole[cols])
