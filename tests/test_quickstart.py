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
