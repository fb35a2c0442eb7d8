"""The minGPT-style contract: the split model is the unsplit model, forward and backward."""
import pytest
import torch

from hsplit_nb.adapters import add_adapters, adapter_names, read_adapter, write_adapter
from hsplit_nb.models import tiny_model
from hsplit_nb.architectures import hidden_size, num_blocks
from hsplit_nb.split import nbytes, split_model, split_step


def _randomise_adapters(model, seed=1):
    """Give every adapter a nonzero B so that every LoRA gradient is nonzero."""
    g = torch.Generator().manual_seed(seed)
    for name in adapter_names(model):
        f = read_adapter(model, name)
        write_adapter(model, name, torch.randn(f.A.shape, generator=g) * 0.3, torch.randn(f.B.shape, generator=g) * 0.3)


def test_split_forward_equals_unsplit_at_every_split_point(tiny, batch):
    model, _ = tiny
    with torch.no_grad():
        ref = model(**batch)
    for s in range(1, num_blocks(model)):
        client, server = split_model(model, s)
        with torch.no_grad():
            smashed = client(batch["input_ids"], batch["attention_mask"])
            out = server(smashed, batch["attention_mask"], batch["labels"])
        assert smashed.shape == (*batch["input_ids"].shape, hidden_size(model))
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


def test_split_backward_gives_the_unsplit_adapter_gradients(family, batch):
    model, _ = tiny_model(family)
    peft_model = add_adapters(model, 4)  # every candidate matrix of every block
    _randomise_adapters(peft_model)
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params)

    peft_model(**batch).loss.backward()
    expected = {n: p.grad.clone() for n, p in params.items()}
    assert all(g.abs().sum() > 0 for g in expected.values())

    for s in range(1, num_blocks(model)):
        peft_model.zero_grad(set_to_none=True)
        client, server = split_model(peft_model, s)
        split_step(client, server, batch, client_opt=None, server_opt=None)
        for n, p in params.items():
            torch.testing.assert_close(p.grad, expected[n], atol=1e-5, rtol=1e-4, msg=f"split {s}: {n}")


def test_split_step_trains_like_the_unsplit_step(family, batch):
    """One SGD step through the five-stage protocol lands on the same adapters as an unsplit step."""
    plain, _ = tiny_model(family)
    split, _ = tiny_model(family)
    plain, split = add_adapters(plain, 2), add_adapters(split, 2)
    for m in (plain, split):
        _randomise_adapters(m)
    opt = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=0.1)
    opt.zero_grad()
    plain(**batch).loss.backward()
    opt.step()

    client, server = split_model(split, 2)
    copt = torch.optim.SGD([p for p in client.parameters() if p.requires_grad], lr=0.1)
    sopt = torch.optim.SGD([p for p in server.parameters() if p.requires_grad], lr=0.1)
    split_step(client, server, batch, copt, sopt)
    for (n, p), (_, q) in zip(plain.named_parameters(), split.named_parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=n)


def test_parts_own_disjoint_blocks_and_only_client_side_embeddings(tiny):
    model, _ = tiny
    client, server = split_model(model, 1)
    cids, sids = {id(p) for p in client.parameters()}, {id(p) for p in server.parameters()}
    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h
    assert {id(p) for p in blocks[0].parameters()} <= cids
    assert not ({id(p) for p in blocks[0].parameters()} & sids)
    assert {id(p) for p in blocks[1].parameters()} <= sids
    embed = model.get_input_embeddings().weight
    assert id(embed) in cids
    # the LM head is the server's; for GPT-2 it is tied to the client's embedding, so both hold that tensor
    assert id(model.lm_head.weight) in sids


def test_bytes_across_the_cut(tiny, batch):
    model, _ = tiny
    model = add_adapters(model, 2)
    client, server = split_model(model, 2)
    r = split_step(client, server, batch, None, None)
    b, t = batch["input_ids"].shape
    d = hidden_size(model)
    assert r.bytes_down == b * t * d * 4
    assert r.bytes_up == b * t * d * 4 + nbytes(batch["attention_mask"], batch["labels"])


@pytest.mark.parametrize("bad", [0, 4, -1, 2.0, "2", True, None])
def test_split_point_out_of_range_names_the_range(bad):
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match=r"split_point must be an integer in \[1, 3\]"):
        split_model(model, bad)
