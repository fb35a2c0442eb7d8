"""The comparison: targets and time to target in log-PPL, means and spreads over seeds, the claims' verdicts, seeds
that repeat and differ, one resumable folder per (setting, method, seed), and the settings of configs/comparison.yaml."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO
from hsplit_nb import experiment
from hsplit_nb.__main__ import main
from hsplit_nb.comparison import ComparisonConfig, collect, finished, read_report, run_comparison, write_report
from hsplit_nb.config import ConfigError, PAPER_BUDGET_FRACTIONS
from hsplit_nb.runfolder import RunFolderError
from hsplit_nb.reporting import (claims, claims_markdown, compare, heterogeneity_cost, summarize_runs,
                                 summary_markdown, targets, time_to)


def _curve(ppls, times=None):
    times = times if times is not None else [10.0 * i for i in range(len(ppls))]
    return pd.DataFrame({"round": range(len(ppls)), "val_ppl": ppls, "sim_time_s": times})


def test_time_to_target_interpolates_in_log_ppl_and_never_extrapolates():
    curve = _curve([20.0, 5.0, 4.0], [0.0, 10.0, 30.0])
    frac = (math.log(5.0) - math.log(4.5)) / (math.log(5.0) - math.log(4.0))  # 0.4722
    assert time_to(curve, 4.5) == pytest.approx(10.0 + frac * 20.0, abs=1e-12)
    assert time_to(curve, 4.5, "round") == pytest.approx(1 + frac, abs=1e-12)
    assert time_to(curve, 5.0) == 10.0  # reached at an evaluation: its time exactly
    assert time_to(curve, 25.0) == 0.0  # already met before training
    assert math.isnan(time_to(curve, 3.99))  # never reached: NaN, not a guess beyond the last evaluation
    linear = 10.0 + (5.0 - 4.5) / (5.0 - 4.0) * 20.0
    assert time_to(curve, 4.5) != pytest.approx(linear)  # log-PPL, not linear PPL


def _curves(best: dict[str, list[float]]):
    rows = []
    for method, per_seed in best.items():
        for seed, b in enumerate(per_seed):
            for r, p in enumerate([10.0, b + 1, b]):
                rows.append({"setting": "s", "method": method, "seed": seed, "round": r, "val_ppl": p,
                             "sim_time_s": 5.0 * r})
    return pd.DataFrame(rows)


def test_targets_are_the_ppl_a_share_of_the_core_methods_reach():
    # mean best PPL per method: a 3.0, b 4.0, c 5.0, d 6.0 (e is not a core method and does not count)
    curves = _curves({"a": [2.0, 4.0], "b": [4.0, 4.0], "c": [5.0], "d": [6.5, 5.5], "e": [1.0]})
    goal = targets(curves, ["a", "b", "c", "d"]).iloc[0]
    assert (goal["t25"], goal["t50"], goal["t75"]) == (3.0, 4.0, 5.0)  # ceil(q * 4)-th best: 1st, 2nd, 3rd
    assert goal["methods"] == 4


def test_summary_gives_mean_spread_and_reached_counts():
    runs = pd.DataFrame({"setting": ["s"] * 3, "method": ["m"] * 3, "seed": [0, 1, 2],
                         "final_ppl": [4.0, 5.0, 6.0], "time_to_t50_s": [10.0, np.nan, 20.0]})
    row = summarize_runs(runs).iloc[0]
    assert row["seeds"] == 3 and row["final_ppl_mean"] == 5.0 and row["final_ppl_std"] == pytest.approx(1.0)
    assert row["time_to_t50_s_mean"] == 15.0 and row["reached_t50"] == "2/3"  # mean over the seeds that reached it
    one = summarize_runs(runs.iloc[:1]).iloc[0]
    assert math.isnan(one["final_ppl_std"])


def _summary(a, sa, b, sb):
    return pd.DataFrame({"setting": ["s", "s"], "method": ["hsplitlora", "splitlora"], "seeds": [3, 3],
                         "final_ppl_mean": [a, b], "final_ppl_std": [sa, sb]})


@pytest.mark.parametrize("a, sa, b, sb, verdict", [
    (4.0, 0.1, 4.5, 0.1, "holds"),               # gain 0.5 > spread sqrt(0.02) = 0.141
    (4.0, 0.3, 4.2, 0.3, "within the spread"),   # gain 0.2 < 0.424
    (4.5, 0.1, 4.0, 0.1, "reversed"),
    (4.0, float("nan"), 4.5, 0.1, "better (one seed, no spread)"),
])
def test_a_claim_holds_only_beyond_the_spread(a, sa, b, sb, verdict):
    got = compare(_summary(a, sa, b, sb), "s", "hsplitlora", "splitlora", "final_ppl")
    assert got["verdict"] == verdict
    assert got["gain"] == pytest.approx(b - a)
    table = claims(_summary(a, sa, b, sb))
    assert table.loc[table["claim"] == "lower PPL than SplitLoRA", "verdict"].item() == verdict
    assert table.loc[table["claim"] == "lower PPL than HetLoRA", "verdict"].item() == "not run"
    md = claims_markdown(table).splitlines()
    assert md[0] == "| claim | s |" and md[2] == f"| lower PPL than SplitLoRA | {verdict}: {a:.3f} vs {b:.3f} |"
    assert md[3] == "| lower PPL than HetLoRA | not run |"


def test_heterogeneity_cost_and_speed_up_ratio_by_hand():
    runs = pd.DataFrame({"setting": ["hom", "hom", "hom", "het", "het", "het", "het", "het"],
                         "method": ["hetlora"] * 2 + ["splitlora"] + ["hetlora"] * 3 + ["splitlora", "ft"],
                         "seed": [0, 1, 0, 0, 1, 2, 0, 0],
                         "final_ppl": [5.0, 5.2, 4.4, 5.3, 5.66, 9.0, 4.5, 4.0]})
    cost = heterogeneity_cost(runs, "hom").set_index("method")
    assert list(cost.index) == ["hetlora", "splitlora"]  # FT was not run in the homogeneous setting
    # HetLoRA: seeds 0 and 1 are paired (0.3 and 0.46); seed 2 has no homogeneous run and is left out
    assert cost.loc["hetlora", "cost"] == pytest.approx(0.38) and cost.loc["hetlora", "seeds"] == 2
    assert cost.loc["hetlora", "cost_std"] == pytest.approx(np.std([0.3, 0.46], ddof=1))
    assert cost.loc["hetlora", "final_ppl_homogeneous"] == pytest.approx(5.1)
    assert cost.loc["splitlora", "cost"] == pytest.approx(0.1) and np.isnan(cost.loc["splitlora", "cost_std"])
    times = pd.DataFrame({"setting": ["s", "s"], "method": ["hsplitlora", "ft"], "seeds": [1, 1],
                          "time_to_t50_s_mean": [2.0, 2.8], "time_to_t50_s_std": [np.nan, np.nan]})
    assert compare(times, "s", "hsplitlora", "ft", "time_to_t50_s")["ratio_b_to_a"] == pytest.approx(1.4)


def test_the_summary_as_markdown_by_hand():
    summary = pd.DataFrame({"setting": ["s", "s", "s"], "method": ["a", "b", "hetlora-strict"], "seeds": [3, 1, 1],
                            "final_ppl_mean": [4.5, 4.25, np.nan], "final_ppl_std": [0.0123, np.nan, np.nan],
                            "time_to_t50_s_mean": [1.5, np.nan, np.nan], "time_to_t50_s_std": [0.25, np.nan, np.nan],
                            "note": [np.nan, np.nan, "strict memory: no client can hold the whole model"]})
    lines = summary_markdown(summary, "s").splitlines()
    assert lines[0] == "| method | seeds | final PPL | sim s to t50 | BLEU | NIST | METEOR | ROUGE-L | CIDEr |"
    assert lines[2] == "| a | 3 | 4.500 ± 0.012 | 1.50 ± 0.25 |  |  |  |  |  |"
    assert lines[3] == "| b | 1 | 4.250 | not reached |  |  |  |  |  |"
    assert lines[4] == "| hetlora-strict | 1 |" + " did not train |" * 7


@pytest.mark.parametrize("ra, rb, verdict", [
    ("3/3", "0/3", "holds (hetlora never reached the target)"),
    ("0/3", "3/3", "reversed (hsplitlora never reached the target)"),
    ("0/3", "0/3", "neither reached the target"),
    ("3/3", "1/3", "undecided (target reached in 3/3 against 1/3 seeds)"),
    ("3/3", "3/3", "holds"),  # 1.0 s against 2.0 s, spread sqrt(0.02)
])
def test_a_time_to_target_never_reached_decides_the_claim(ra, rb, verdict):
    summary = pd.DataFrame({"setting": ["s", "s"], "method": ["hsplitlora", "hetlora"], "seeds": [3, 3],
                            "time_to_t50_s_mean": [1.0 if ra != "0/3" else np.nan, 2.0 if rb != "0/3" else np.nan],
                            "time_to_t50_s_std": [0.1, 0.1], "reached_t50": [ra, rb]})
    assert compare(summary, "s", "hsplitlora", "hetlora", "time_to_t50_s")["verdict"] == verdict
    [said] = [line for line in claims_markdown(claims(summary)).splitlines() if "faster than HetLoRA (to t50)" in line]
    assert said.endswith(f"| {verdict}: {'1 s' if ra != '0/3' else 'never'} vs {'2 s' if rb != '0/3' else 'never'} |")


def _tiny_comparison(**over):
    fields = dict(base="quick", common={"rounds": 1, "local_steps": 1, "eval_mrs": 2, "num_beams": 1,
                                        "max_new_tokens": 6, "val_examples": 8, "events": [], "eval_seed": 0},
                  settings={"a": {}, "b": {"overrides": {"budgets": [5e6, 8e6, 9e6]}, "seeds": [0]}},
                  seeds=[0, 1], core=["splitlora", "cenlora"], extras=["hsplitlora"], extra_seeds=[0])
    return ComparisonConfig(**{**fields, **over})


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Setting a of the tiny comparison, core methods only, both seeds: 4 runs, shared by the tests below."""
    out = tmp_path_factory.mktemp("comparison")
    ccfg = _tiny_comparison()
    run_comparison(ccfg, out, settings=["a"], methods=["splitlora", "cenlora"], progress=False)
    return ccfg, out


def test_each_run_is_its_own_folder_resumes_and_merges_into_one_tidy_table(ran, monkeypatch):
    ccfg, out = ran
    assert [(s.setting, s.method, s.seed) for s in ccfg.runs()] == [  # seed by seed
        ("a", "splitlora", 0), ("a", "cenlora", 0), ("a", "hsplitlora", 0), ("b", "splitlora", 0), ("b", "cenlora", 0),
        ("b", "hsplitlora", 0), ("a", "splitlora", 1), ("a", "cenlora", 1)]
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/*/seed*")) == [
        "a/cenlora/seed0", "a/cenlora/seed1", "a/splitlora/seed0", "a/splitlora/seed1"]
    assert not list(out.rglob("*.png"))  # per-run figures are left to the report
    monkeypatch.setattr(experiment, "_Run", None)  # a finished run trains nothing when the comparison goes on
    run_comparison(ccfg, out, settings=["a"], methods=["splitlora", "cenlora"], progress=False)
    curves, runs, goal = collect(ccfg, out)
    assert len(runs) == 4 and set(runs["seed"]) == {0, 1}
    assert {"setting", "method", "seed", "final_ppl", "time_to_t25_s", "time_to_t50_s", "time_to_t75_s", "BLEU",
            "NIST", "METEOR", "ROUGE_L", "CIDEr", "eval_mrs"} <= set(runs.columns)
    assert (runs["eval_mrs"] == 2).all() and (runs["wall_time_run_s"] > 0).all()
    assert set(curves["round"]) == {0, 1} and len(curves) == 8
    assert goal["setting"].tolist() == ["a"]


def test_a_killed_run_keeps_the_seconds_of_its_finished_rounds(tmp_path):
    """elapsed.json is written after every round, so a run killed before it ends (no finally block runs: the
    session's end) still counts the time its rounds took; the resumed run adds to it."""
    import subprocess
    import sys

    script = f"""
import os, sys
sys.path.insert(0, {str(REPO / "tests")!r})
from test_comparison import _tiny_comparison
from hsplit_nb import experiment
from hsplit_nb.comparison import run_comparison
experiment._Run.final_metrics = lambda self: os._exit(9)  # killed after the last round
ccfg = _tiny_comparison(common={{**_tiny_comparison().common, "rounds": 2}})
run_comparison(ccfg, {str(tmp_path)!r}, settings=["a"], methods=["splitlora"], seeds=[0], progress=False)
"""
    assert subprocess.run([sys.executable, "-c", script], cwd=REPO).returncode == 9
    ccfg = _tiny_comparison(common={**_tiny_comparison().common, "rounds": 2})
    spec = ccfg.runs(settings=["a"], methods=["splitlora"], seeds=[0])[0]
    first = json.loads((spec.folder(tmp_path) / "elapsed.json").read_text())["seconds"]
    assert first > 0 and not finished(spec, tmp_path)
    run_comparison(ccfg, tmp_path, settings=["a"], methods=["splitlora"], seeds=[0], progress=False)
    assert finished(spec, tmp_path)
    assert json.loads((spec.folder(tmp_path) / "elapsed.json").read_text())["seconds"] > first


def test_a_finished_run_of_another_protocol_is_refused_not_merged(ran):
    ccfg, out = ran
    changed = ccfg.model_copy(update={"common": {**ccfg.common, "lr": 0.01}})
    with pytest.raises(RunFolderError, match=r"seed0 holds a finished run of another protocol \(lr: 0.003 -> 0.01\)"):
        collect(changed, out)


def test_seeds_repeat_exactly_and_differ_from_each_other(ran, tmp_path):
    ccfg, out = ran
    run_comparison(ccfg, tmp_path, settings=["a"], methods=["splitlora"], seeds=[0], progress=False)
    first, again = collect(ccfg, out)[0], collect(ccfg, tmp_path)[0]
    first = first[first["method"] == "splitlora"]
    cols = ["round", "val_ppl", "train_loss", "sim_time_s", "bytes_up", "bytes_down"]
    seed0 = first[first["seed"] == 0][cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(seed0, again[cols].reset_index(drop=True))
    seed1 = first[first["seed"] == 1][cols].reset_index(drop=True)
    assert seed1["val_ppl"].iloc[0] == seed0["val_ppl"].iloc[0]  # round 0: the same model on the same MRs
    assert seed1["train_loss"].iloc[1] != seed0["train_loss"].iloc[1]  # other partition, initialisation, order
    assert seed1["val_ppl"].iloc[1] != seed0["val_ppl"].iloc[1]


def test_the_report_writes_tables_and_figures_with_spreads(ran, tmp_path, capsys):
    ccfg, out = ran
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(ccfg.model_dump()))
    assert main(["compare", "--config", str(cfg_path), "--out", str(out), "--report", str(tmp_path / "rep"),
                 "--report-only"]) == 0
    rep = tmp_path / "rep"
    summary = pd.read_csv(rep / "comparison_summary.csv")
    assert summary["seeds"].tolist() == [2, 2] and summary["final_ppl_std"].notna().all()
    assert len(pd.read_csv(rep / "comparison.csv")) == 4
    assert (rep / "comparison_summary.md").read_text().startswith("### a\n\n| method | seeds | final PPL |")
    assert set(read_report(rep)) == {"comparison", "comparison_summary", "comparison_claims", "comparison_targets",
                                     "comparison_curves"}
    for f in ("comparison_a_rounds.png", "comparison_a_time.png", "comparison_final_ppl.png"):
        assert (rep / f).stat().st_size > 5000
    assert "4 runs" in capsys.readouterr().out



@pytest.mark.parametrize("cut", [0.5, -1])
def test_a_report_table_cut_short_is_refused_naming_it(ran, tmp_path, cut):
    """A half-written comparison.csv (cut mid-row, or without its last line break) is not read back as a report."""
    ccfg, out = ran
    rep = tmp_path / "rep"
    write_report(ccfg, out, rep)
    path = rep / "comparison.csv"
    text = path.read_text()
    path.write_text(text[: int(len(text) * cut)] if cut > 0 else text[:cut])
    with pytest.raises(ValueError, match=r"comparison\.csv: not a whole table \(row \d+ of \d+"):
        read_report(rep)

def test_a_method_no_client_can_train_is_a_result_in_the_report(tmp_path):
    """HetLoRA with strict memory where no budget holds the whole model: the run finishes as a note, counts as
    done (a resumed comparison does not retry it), and the report keeps it as a row with no PPL, drawn as
    'did not train' (not as 'not reached') beside a method that trained."""
    from hsplit_nb.plots import plot_summary_bars

    ccfg = _tiny_comparison(extras=["hetlora-strict"], settings={"a": {}}, seeds=[0], core=["splitlora"])
    run_comparison(ccfg, tmp_path, progress=False)
    assert all(finished(spec, tmp_path) for spec in ccfg.runs())
    runs = collect(ccfg, tmp_path)[1].set_index("method")
    assert runs.loc["hetlora-strict", "eval_mrs"] == 0 and np.isnan(runs.loc["hetlora-strict", "final_ppl"])
    assert "no client can hold the whole model (largest budget" in runs.loc["hetlora-strict", "note"]
    assert runs.loc["splitlora", "eval_mrs"] == 2 and runs.loc["splitlora", "final_ppl"] > 1
    summary = write_report(ccfg, tmp_path, tmp_path / "rep")["comparison_summary"].set_index("method")
    assert summary.loc["hetlora-strict", "note"].startswith("strict memory")
    assert pd.isna(summary.loc["splitlora", "note"])
    fig = plot_summary_bars(summary.reset_index(), "final_ppl", "PPL")
    assert [t.get_text() for t in fig.axes[0].texts] == ["did not train"]
    assert (tmp_path / "rep" / "comparison_a_rounds.png").is_file()


def test_bad_comparison_configs_are_named():
    with pytest.raises(ConfigError, match=r"config field 'core': 'splitlor' is not allowed; a method, one of"):
        _tiny_comparison(core=["splitlor"])
    with pytest.raises(ConfigError, match=r"comparison setting 'b'.*budgets"):
        _tiny_comparison(settings={"b": {"overrides": {"budgets": [1.0]}}})
    with pytest.raises(ConfigError, match=r"config field 'settings': 'z' is not allowed; one of a, b"):
        _tiny_comparison().runs(settings=["z"])
    with pytest.raises(ConfigError, match=r"config field 'settings.b.methods': 'flexlora' is not allowed; a method of"):
        _tiny_comparison(settings={"a": {}, "b": {"methods": ["flexlora"]}})
    # issue 25: duplicate seeds, a selection that selects nothing, a setting whose budgets the model cannot hold
    with pytest.raises(ConfigError, match=r"config field 'seeds': \[0, 0\] is not allowed; distinct seeds"):
        _tiny_comparison(seeds=[0, 0])
    with pytest.raises(ConfigError, match=r"config field 'settings.a.seeds': \[1, 1\] is not allowed; distinct"):
        _tiny_comparison(settings={"a": {"seeds": [1, 1]}})
    with pytest.raises(ConfigError, match=r"'seeds': \[7\] is not allowed; a selection with at least one run"):
        _tiny_comparison().runs(seeds=[7])
    tight = _tiny_comparison(settings={"a": {}, "b": {"overrides": {"budgets": [11.5e6, 11.5e6, 11.5e6]},
                                                      "methods": ["splitlora"]}})
    tight.settings["b"].overrides["budgets"] = [2e3, 11.5e6, 11.5e6]  # too small, found before any run starts
    with pytest.raises(ConfigError, match=r"comparison run b/splitlora/seed0: config field 'budgets\[0\]'"):
        run_comparison(tight, "/nonexistent/never-written", settings=["b"], progress=False)


def test_a_setting_may_run_some_of_the_methods():
    ccfg = _tiny_comparison(settings={"a": {}, "b": {"methods": ["splitlora"]}})
    assert {(r.setting, r.method) for r in ccfg.runs()} == {("a", m) for m in ccfg.core + ccfg.extras} | \
        {("b", "splitlora")}
    narrowed = ccfg.narrow(methods=["hsplitlora"])  # b keeps none of its methods: it has no runs, and is dropped
    assert list(narrowed.settings) == ["a"]


def test_the_shipped_comparison_and_its_binding_setting():
    """configs/comparison.yaml: 61 runs, and setting (b) follows its stated rule on SmolLM2-135M."""
    from hsplit_nb.costs import uniform_budget, weight_bytes
    from hsplit_nb.models import model_config
    from hsplit_nb.planner import uniform_rank, weakest_split
    from hsplit_nb.costs import ClientSpec

    ccfg = ComparisonConfig.load(REPO / "configs" / "comparison.yaml")
    assert [ccfg.homogeneous(name) for name in ccfg.settings] == [False, False, True]
    # core at 3 seeds in (a) and (b); the extras at 1; (c): the paper's homogeneous methods, 1 seed
    assert len(ccfg.runs()) == 8 * 3 * 2 + 4 * 2 + 5
    assert [r.method for r in ccfg.runs(settings=["c-homogeneous"])] == ["hsplitlora", "splitlora", "hetlora",
                                                                         "cenlora", "ft"]
    b = ccfg.experiment("b-binding", "splitlora", 0)
    config = model_config(b.model)
    w = weight_bytes(config)
    least = uniform_budget(config, 1, 2, b.batch_size, b.seq_len, b.headroom) / w
    weakest = math.ceil(least * 1e4) / 1e4
    assert b.budgets == [round(weakest * f / PAPER_BUDGET_FRACTIONS[0], 4) for f in PAPER_BUDGET_FRACTIONS]
    clients = [ClientSpec(f"c{k}", m) for k, m in enumerate(b.budget_bytes(config))]
    s = weakest_split(config, clients, b.batch_size, b.seq_len, b.rank_levels, headroom=b.headroom)
    assert s == 1 and uniform_rank(config, clients[0].memory, s, b.batch_size, b.seq_len, b.rank_levels,
                                   headroom=b.headroom) == 2  # SplitLoRA is held to rank 2 at split 1
    a = ccfg.experiment("a-paper", "splitlora", 0)
    assert uniform_rank(config, a.budget_bytes(config)[0], 1, a.batch_size, a.seq_len, a.rank_levels,
                        headroom=a.headroom) == 16  # in (a) memory does not bind


def test_presets_and_a_narrowed_comparison_keep_the_protocol():
    full = ComparisonConfig.preset("comparison")
    part = full.narrow(["b-binding"], ["hsplitlora", "ft"], [0, 1], rounds=2)
    assert list(part.settings) == ["b-binding"] and part.core == ["hsplitlora"] and part.extras == ["ft"]
    assert [(s.method, s.seed) for s in part.runs()] == [("hsplitlora", 0), ("ft", 0), ("hsplitlora", 1), ("ft", 1)]
    cfg = part.experiment("b-binding", "hsplitlora", 1)
    assert cfg.rounds == 2 and cfg.budgets == full.experiment("b-binding", "hsplitlora", 1).budgets
    assert cfg.batch_size == 4 and cfg.eval_mrs == 100  # the rest of the protocol is kept
    quick = ComparisonConfig.preset("comparison_quick")
    assert set(quick.settings) == set(full.settings) and quick.core == full.core and quick.extras == full.extras
    assert part.fingerprint() != full.fingerprint() != quick.fingerprint()
    assert part.fingerprint() == full.narrow(["b-binding"], ["hsplitlora", "ft"], [0, 1], rounds=2).fingerprint()
    with pytest.raises(ConfigError, match=r"config field 'comparison': 'nope' is not allowed"):
        ComparisonConfig.preset("nope")


def _bench():
    """bench/comparison.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_comparison", REPO / "bench" / "comparison.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _claim_all(out):
    bench = _bench()
    return [f"{r.setting}/{r.method}/{r.seed}" for r in _tiny_comparison().runs() if bench.claim(r, out)]


def test_workers_claim_each_run_exactly_once(tmp_path):
    """bench/comparison.py --workers: workers racing for the same runs take each one once; a new invocation
    clears the old claims (a killed invocation's claims must not block its runs)."""
    from concurrent.futures import ProcessPoolExecutor

    bench, runs = _bench(), _tiny_comparison().runs()
    with ProcessPoolExecutor(4) as pool:
        taken = list(pool.map(_claim_all, [tmp_path] * 4))
    assert sorted(sum(taken, [])) == sorted(f"{r.setting}/{r.method}/{r.seed}" for r in runs)
    assert not bench.claim(runs[0], tmp_path)
    bench.clear_claims(tmp_path)
    assert bench.claim(runs[0], tmp_path)


# ---- a finished run is a proven run (issue 25) ------------------------------------------------------------------
def _damaged(out, tmp_path, damage):
    """A copy of the finished comparison folder with one run damaged by `damage(folder of a/splitlora/seed0)`."""
    import shutil

    copy = shutil.copytree(out, tmp_path / "copy")
    damage(copy / "a" / "splitlora" / "seed0")
    return copy


def _drop_last_round(folder):
    df = pd.read_csv(folder / "results.csv")
    df[df["round"] < df["round"].max()].to_csv(folder / "results.csv", index=False)


def _blank_cider(folder):
    df = pd.read_csv(folder / "metrics.csv")
    df["CIDEr"] = np.nan
    df.to_csv(folder / "metrics.csv", index=False)


def _mangle_outputs(folder):
    df = pd.read_csv(folder / "metrics.csv")
    df["outputs"] = '["a generated text", "cut'
    df.to_csv(folder / "metrics.csv", index=False)


def _other_data(folder):
    fp = json.loads((folder / "fingerprint.json").read_text())
    fp["data_files"] = {k: "0" * 64 for k in fp["data_files"]}
    (folder / "fingerprint.json").write_text(json.dumps(fp))


FINISHED_BUT_NOT_WHOLE = [
    ("results lost their last round", _drop_last_round, r"not a whole finished run: results\.csv stops at round 0 of 1"),
    ("a truncated metrics row (CIDEr NaN)", _blank_cider, r"not a whole finished run: metrics\.csv lacks a finite CIDEr"),
    ("outputs that do not parse", _mangle_outputs, r"outputs do not parse as the run's generated texts"),
    ("a finished run on other data", _other_data, r"holds a finished run of other data \(data file builtin/dev\.csv changed"),
]


@pytest.mark.parametrize("damage,match", [c[1:] for c in FINISHED_BUT_NOT_WHOLE], ids=[c[0] for c in FINISHED_BUT_NOT_WHOLE])
def test_a_finished_run_that_is_not_whole_is_refused_naming_it(ran, tmp_path, damage, match):
    ccfg, out = ran
    copy = _damaged(out, tmp_path, damage)
    with pytest.raises(RunFolderError, match=match):
        collect(ccfg, copy)
    collect(ccfg, out)  # the undamaged folder still reads


def test_the_report_goes_under_the_comparisons_own_folder_and_nothing_else_changes(ran, tmp_path):
    """bench/comparison.py --out X writes the report into X; the checkout's bench/results/ is left alone."""
    import shutil
    import subprocess

    ccfg, out = ran
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(ccfg.model_dump()))
    copy = shutil.copytree(out, tmp_path / "x")

    def status():
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", "bench", "configs"],
                              cwd=REPO, capture_output=True, text=True, check=True).stdout
    before = status()
    _bench().main(["--config", str(config), "--data", "builtin", "--out", str(copy), "--report-only"])
    assert status() == before
    assert (copy / "comparison.csv").is_file() and (copy / "comparison.json").is_file()
    assert len(pd.read_csv(copy / "comparison.csv")) == 4


def test_with_data_reaches_every_run_and_the_checks_of_finished_runs(ran, tmp_path):
    """The data folder given on the command line is the one every run trains on and every finished run is
    checked against (before, the checks read the preset's data and refused the comparison's own finished runs)."""
    ccfg, out = ran
    assert {s.cfg.data for s in ccfg.with_data("/some/e2e").runs()} == {"/some/e2e"}
    assert ccfg.with_data(None) is ccfg
    assert len(collect(ccfg.with_data("builtin"), out)[1]) == 4
