"""Invariants every method in the method table keeps, run parametrised over the table (as peft's TEST_CASES
feed its shared checks), so one failing method does not hide the others:

- it learns: the validation PPL after the last round is below the untrained model's;
- its state round-trips through a checkpoint: a run stopped after a round and resumed gives the rows of
  an uninterrupted run;
- its bytes on the wire equal its simulated bytes, and the multi-process rows equal the in-process ones.

The setting exercises a dropout (c0 away in round 2, back in round 3 with a larger budget) and two clients
of very different budgets, so that even HetLoRA with strict memory has a client that holds the whole model.
"""
import pandas as pd
import pytest

from conftest import preset_fields
from hsplit_nb.distributed import launch, wire_bytes
from hsplit_nb.config import ExperimentConfig
from hsplit_nb.experiment import run_experiment
from hsplit_nb.federation import BYTE_KINDS
from hsplit_nb.methods import METHODS

EVENTS = [{"type": "dropout", "client": "c0", "start": 2, "end": 2},
          {"type": "budget", "client": "c0", "round": 3, "memory": 11_500_000}]
CONFIG = ExperimentConfig(**preset_fields("quick", num_clients=2, budgets=[4_500_000, 50_000_000], rounds=3,
                                          local_steps=2, final_metrics=False), events=EVENTS, methods=list(METHODS))
ROWS = ["val_ppl", "train_loss", "sim_time_s", "bytes_up", "bytes_down", "split_c0", "split_c1", "rank_c0",
        "rank_c1", "present", "trainable_client_params", "trainable_server_params"]


@pytest.fixture(scope="module")
def in_process():
    return run_experiment(CONFIG, progress=False)


@pytest.fixture(scope="module")
def multi_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("table") / "run"
    df = launch(CONFIG, out, step_timeout=60, idle_timeout=120, init_timeout=60, progress=False, timeout=900)
    return df, wire_bytes(out)


def _rows(df, method):
    return df[df["method"] == method].set_index("round")


@pytest.mark.parametrize("method", list(METHODS))
def test_it_learns(in_process, method):
    rows = _rows(in_process, method)
    assert list(rows.index) == [0, 1, 2, 3], method
    assert rows.loc[3, "val_ppl"] < rows.loc[0, "val_ppl"], method
    assert rows.loc[3, "sim_time_s"] > rows.loc[1, "sim_time_s"] > 0, method


@pytest.mark.parametrize("method", list(METHODS))
def test_its_state_round_trips_through_a_checkpoint(in_process, tmp_path, method):
    class Stop(Exception):
        pass

    def stop_after_round_2(name, row):
        if row["round"] == 2:
            raise Stop

    cfg = CONFIG.replace(methods=[method])
    with pytest.raises(Stop):
        run_experiment(cfg, out_dir=tmp_path, progress=False, on_round=stop_after_round_2)
    resumed = run_experiment(cfg, out_dir=tmp_path, progress=False).set_index("round")
    pd.testing.assert_frame_equal(resumed[ROWS], _rows(in_process, method)[ROWS], check_dtype=False, atol=1e-9,
                                  rtol=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_multi_process_equals_in_process_and_its_wire_bytes_its_simulated_bytes(in_process, multi_process, method):
    real, wire = multi_process
    pd.testing.assert_frame_equal(_rows(real, method)[ROWS], _rows(in_process, method)[ROWS], check_dtype=False,
                                  atol=1e-5, rtol=0)
    clients = in_process.attrs["clients"]
    simulated = clients[clients["method"] == method].groupby("client")[list(BYTE_KINDS)].sum()
    on_wire = wire[wire["method"] == method].set_index("client")
    if not METHODS[method].federated:  # central methods run on the server: nothing crosses the wire
        assert (simulated == 0).all().all() and on_wire.empty, method
        return
    for client in CONFIG.client_names():
        for kind in BYTE_KINDS:
            assert on_wire.loc[client, kind] == simulated.loc[client, kind], (method, client, kind)
