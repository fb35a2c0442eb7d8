import os
from pathlib import Path

import pytest
import torch

from hsplit_nb.architectures import ARCHITECTURES
from hsplit_nb.config import preset
from hsplit_nb.data import Collator, encode
from hsplit_nb.models import tiny_model

REPO = Path(__file__).resolve().parent.parent
E2E_DIR = Path(os.environ.get("HSPLIT_E2E_DIR", REPO.parent / "shared" / "e2e"))


def preset_fields(name: str, **overrides) -> dict:
    """A configs/ preset's fields with overrides, without its method list and event schedule (tests add their own)."""
    fields = preset(name, **overrides).to_dict()
    return {k: v for k, v in fields.items() if k not in ("methods", "events")}


def e2e_dir() -> Path:
    """The shared E2E files; CI must have them, elsewhere their absence skips the tests that read them."""
    if not (E2E_DIR / "devset.csv").is_file():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"CI expects the E2E data at {E2E_DIR}")
        pytest.skip(f"E2E data not found at {E2E_DIR} (set HSPLIT_E2E_DIR)")
    return E2E_DIR


@pytest.fixture(params=list(ARCHITECTURES))
def family(request):
    return request.param


@pytest.fixture
def tiny(family):
    return tiny_model(family)


def padded_batch(tokenizer, seq_len=96):
    """Four examples of clearly unequal lengths, right-padded, prompt masked out of the labels."""
    rows = [("name[A], area[riverside]", "A is by the river."),
            ("name[The Copper Kettle], eatType[pub], food[French], priceRange[high]",
             "The Copper Kettle is an expensive French pub with a long description that gets cut."),
            ("name[B], near[the Museum]", "B."),
            ("name[Cedar Table], familyFriendly[yes]", "Cedar Table welcomes children of all ages.")]
    batch = Collator(tokenizer.pad_token_id)([encode(tokenizer, mr, ref, seq_len) for mr, ref in rows])
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 4 and (lengths < batch["input_ids"].shape[1]).any()
    return batch


@pytest.fixture
def batch(tiny):
    return padded_batch(tiny[1])


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
