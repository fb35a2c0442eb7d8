"""bench/gpu_comparison.py's logic on the CPU with the tiny model: the probe, the steps it affords, the scaled
config (every test MR, 256 validation rows), and the comparison it runs."""
import importlib.util

import pytest
import yaml

from conftest import REPO


def _bench():
    sys_path = str(REPO / "bench")
    import sys

    if sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    spec = importlib.util.spec_from_file_location("bench_gpu_comparison", REPO / "bench" / "gpu_comparison.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_steps_afforded_follow_the_probe_by_hand():
    bench = _bench()
    figures = {"hsplitlora": {"seconds_per_local_step": 0.05, "seconds_evaluation_and_generation": 2.0,
                              "validation_rows": 64, "test_mrs": 64},
               "splitlora": {"seconds_per_local_step": 0.04, "seconds_evaluation_and_generation": 1.0,
                             "validation_rows": 64, "test_mrs": 64}}
    # 21 runs, 4 at a time, 600 s: 600 * 4 / 21 = 114.3 s per run, less 2.0 * 630 / 64 = 19.7 s of evaluation,
    # at 0.05 s per step: 1891 steps, in 10-step rounds 1890
    assert bench.afford(figures, 21, 4, 600.0, 240, 10) == 1890
    assert bench.afford(figures, 21, 4, 60.0, 240, 10) == 240  # never below the floor


def test_the_probe_writes_a_scaled_comparison_config(tmp_path):
    bench = _bench()
    result = bench.main(["--data", "builtin", "--out", str(tmp_path), "--device", "cpu", "--model", "tiny-llama",
                         "--budgets", "4500000", "8000000", "11500000", "9000000", "10000000", "--seq-len", "256",
                         "--budget-s", "1", "--min-steps", "20", "--workers", "2", "--plan-only"])
    assert result["local_steps_afforded"] == 20 and result["rounds"] == 2
    for method in ("hsplitlora", "splitlora"):
        assert result["probe"][method]["seconds_per_local_step"] > 0
    config = yaml.safe_load((tmp_path / "comparison_gpu.yaml").read_text())
    common = config["common"]
    assert (common["val_examples"], common["eval_mrs"], common["model"], common["rounds"]) == (256, 630, "tiny-llama", 2)
    assert common["testbed"] == "edge" and common["local_steps"] == 10
    assert (tmp_path / "probe.json").is_file()
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path)])  # --data is required
