"""The wire protocol between two real processes (gloo, a file store): tensors of any dtype and shape arrive
intact behind their header, bytes are counted per kind, and a wrong kind or a silent peer is a clear error."""
import datetime
import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hsplit_nb.distributed.wire import HEADER_LEN, PeerLost, Wire

# deterministic values: each spawned process builds them again
TENSORS = {"f32": torch.arange(24.0).view(2, 3, 4) / 7, "bf16": torch.linspace(-1, 1, 5).to(torch.bfloat16), "i64": torch.arange(6).view(2, 3),
           "scalar": torch.tensor(3.5, dtype=torch.float64), "empty": torch.zeros(0, 4), "mask": torch.ones(2, 2).bool()}


def _peer(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    wire = Wire(timeout=20)
    result = {}
    if rank == 1:
        wire.send_tensors(0, TENSORS, "smashed_up")
        wire.send(0, torch.ones(0), "grad_down")   # the server expects adapter_up here (no payload follows)
        wire.recv_obj(0, timeout=20)               # then stays silent until told to finish
    else:
        got = wire.recv_tensors(1, "smashed_up")
        result["equal"] = {k: bool(torch.equal(got[k], v)) and got[k].dtype == v.dtype for k, v in TENSORS.items()}
        result["counted"] = wire.received[1]["smashed_up"]
        result["headers"] = wire.received[1]["header"]
        try:
            wire.recv(1, "adapter_up")
        except RuntimeError as exc:
            result["wrong_kind"] = str(exc)
        try:
            wire.recv(1, "smashed_up", timeout=1.0)
        except PeerLost as exc:
            result["silent"] = str(exc)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    if rank == 0:
        dist.destroy_process_group()


def test_two_processes_exchange_headers_kinds_and_timeouts(tmp_path):
    import time

    out = str(tmp_path / "result")
    mp.start_processes(_peer, args=(str(tmp_path / "store"), out), nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "result.0").is_file():
        time.sleep(0.2)
    result = json.loads((tmp_path / "result.0").read_text())
    assert all(result["equal"].values()), result["equal"]
    assert result["counted"] == sum(t.numel() * t.element_size() for t in TENSORS.values())
    # one header per tensor plus one for the names message
    assert result["headers"] == (len(TENSORS) + 1) * HEADER_LEN * 8
    assert result["wrong_kind"] == "protocol error: expected adapter_up from rank 1, got grad_down"
    assert result["silent"].startswith("rank 1: waiting for smashed_up failed")
