"""The one vocabulary between server and clients: every operation is a message handled by the stage of the
same name, a client or a transport missing one operation cannot be built, and every message survives its
wire form with its tensors under the byte kind the ledger counts."""
import pickle
import re

import pytest
import torch

from hsplit_nb.federation import VOCABULARY, ClientProxy, ClientStages, InProcess, Message
from hsplit_nb.federation.ledger import BYTE_KINDS
from hsplit_nb.federation.messages import (
    Apply, Backward, CatchUp, Configure, End, Factors, Hello, Open, Optimizer, Scores, Smashed, Step, Sync, Upload,
)

OPERATIONS = sorted(ClientStages.__abstractmethods__)
T = torch.arange(6.0).view(2, 3)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _stages(missing: str | None = None):
    calls = []
    body = {op: (lambda op: lambda self, msg: calls.append(op))(op) for op in OPERATIONS if op != missing}
    return type("Stages", (ClientStages,), body), calls


def _example(cls):
    """One instance of each message, with tensors where it carries any."""
    examples = {
        "Open": Open("hsplitlora"), "Sync": Sync(2, {"m": 4}, 3, {"w": T}, {"m|A": T}, {"state": {0: {"exp_avg": T}}}),
        "Configure": Configure(3, {"m": 4}, 2, False, ["m"], [("m", T, T.T)], [{"w": T}]),
        "Away": cls(1) if cls.__name__ == "Away" else None, "CatchUp": CatchUp(True, 4, {"w": T}, {}),
        "BeginRound": cls(2) if cls.__name__ == "BeginRound" else None, "Step": Step([3, 1, 2], True),
        "Backward": Backward(T, scored=True), "Upload": Upload(), "Apply": Apply(False, 5, [("m", T, T.T)], {"m|A": T}),
        "OptimizerState": cls() if cls.__name__ == "OptimizerState" else None,
        "Finish": cls(True) if cls.__name__ == "Finish" else None, "End": End(), "Hello": Hello("c0", 7),
        "Smashed": Smashed(T, T.long(), T.long()), "Loss": cls(1.5) if cls.__name__ == "Loss" else None,
        "Scores": Scores(T.double()), "Factors": Factors({"m|A": T}), "Optimizer": Optimizer(None),
    }
    return examples[cls.__name__]


def test_every_operation_is_one_message_handled_by_the_stage_of_its_name():
    stages_cls, calls = _stages()
    requests = [c for c in VOCABULARY.values() if _snake(c.__name__) in OPERATIONS]
    assert sorted(_snake(c.__name__) for c in requests) == OPERATIONS
    for cls in requests:
        _example(cls).handle(stages_cls())
        assert calls[-1] == _snake(cls.__name__)
    with pytest.raises(TypeError, match="Hello is a reply"):
        Hello("c0").handle(stages_cls())


@pytest.mark.parametrize("missing", OPERATIONS)
def test_a_client_missing_one_operation_is_refused_when_it_is_built(missing):
    stages_cls, _ = _stages(missing)
    with pytest.raises(TypeError, match=missing):
        stages_cls()


@pytest.mark.parametrize("missing", ["post", "collect"])
def test_a_transport_missing_one_operation_is_refused_when_it_is_built(missing):
    body = {op: lambda self, msg: None for op in ("post", "collect") if op != missing}
    with pytest.raises(TypeError, match=missing):
        type("Transport", (ClientProxy,), body)()


@pytest.mark.parametrize("name", sorted(VOCABULARY))
def test_every_message_round_trips_its_wire_form(name):
    msg = _example(VOCABULARY[name])
    head, tensors = msg.to_wire()
    assert head["op"] == name and head["tensors"] == len(tensors)
    assert msg.kind in (*BYTE_KINDS, "control", "sync") and (tensors == [] or msg.kind != "control")
    back = Message.from_wire(pickle.loads(pickle.dumps(head)), [t.clone() for t in tensors])
    assert type(back) is type(msg)
    for (a, b) in zip(back.to_wire()[1], tensors):
        assert torch.equal(a, b) and a.dtype == b.dtype
    assert back.to_wire()[0] == head


def test_the_wire_form_carries_exactly_the_tensors_the_ledger_counts():
    """Configure's folds and new blocks are what `weights_down` counts; Apply's merges and factors `adapter_down`."""
    _, tensors = Configure(3, {}, 2, False, [], [("m", T, T.T)], [{"w": T, "v": T[:1]}]).to_wire()
    assert sum(t.numel() * t.element_size() for t in tensors) == 4 * (6 + 6 + 6 + 3)
    _, tensors = Apply(True, 1, [("m", T, T.T)], {"m|A": T}).to_wire()
    assert sum(t.numel() * t.element_size() for t in tensors) == 4 * 18


def test_an_unknown_message_is_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown message 'Forward'; the vocabulary is \['Apply'"):
        Message.from_wire({"op": "Forward", "fields": {}, "tensors": 0}, [])


def test_in_process_runs_an_answered_message_when_it_is_collected():
    stages_cls, calls = _stages()
    proxy, step = InProcess(stages_cls()), Step([0], False)
    proxy.post(Backward(T, scored=False))
    assert calls == ["backward"]  # not answered: runs at once
    proxy.post(step)
    assert calls == ["backward"]
    proxy.collect(step)
    assert calls == ["backward", "step"]
    with pytest.raises(RuntimeError, match=r"collect\(Step\) without posting it first"):
        proxy.collect(step)
