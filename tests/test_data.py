"""Data: E2E CSV loading and errors, the built-in generator, prompt masking, collation, partitioning."""
import collections

import pandas as pd
import pytest

from conftest import e2e_dir
from hsplit_nb.data import (
    BUILTIN_DIR, E2E_ATTRIBUTES, IGNORE, SEPARATOR, Collator, encode, generate_builtin, group_references,
    load_builtin, load_e2e, parse_mr, partition,
)
from hsplit_nb.models import byte_tokenizer


def test_parse_mr():
    assert parse_mr("name[Alimentum], area[city centre], familyFriendly[no]") == {
        "name": "Alimentum", "area": "city centre", "familyFriendly": "no"}
    assert parse_mr("customer rating[5 out of 5]") == {"customer rating": "5 out of 5"}
    for bad in ["", "name Alimentum", "name[Alimentum", "name[A] area[B]"]:
        with pytest.raises(ValueError):
            parse_mr(bad)


def _write(tmp_path, text, name="x.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_e2e_errors_name_the_file_and_row(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_e2e(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match=r"x\.csv: the file is empty"):
        load_e2e(_write(tmp_path, ""))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['ref'\]"):
        load_e2e(_write(tmp_path, "mr,text\nname[A],A.\n"))
    with pytest.raises(ValueError, match="header but no rows"):
        load_e2e(_write(tmp_path, "mr,ref\n"))
    with pytest.raises(ValueError, match=r"x\.csv, row 3: cannot parse meaning representation 'name\[B'"):
        load_e2e(_write(tmp_path, 'mr,ref\nname[A],A is fine.\nname[B,B is not.\n'))
    with pytest.raises(ValueError, match=r"row 2: empty reference"):
        load_e2e(_write(tmp_path, 'mr,ref\nname[A],\n'))


def test_real_e2e_files_load_through_a_path():
    d = e2e_dir()
    dev, test = load_e2e(d / "devset.csv"), load_e2e(d / "testset_w_refs.csv")
    assert (len(dev), dev["mr"].nunique()) == (4672, 547)
    assert (len(test), test["mr"].nunique()) == (4693, 630)
    grouped = group_references(test)
    assert len(grouped) == 630 and sum(len(r) for r in grouped["refs"]) == 4693
    assert grouped["refs"].map(len).max() > 1


def test_builtin_data_is_what_the_generator_makes():
    """The committed CSVs are exactly the deterministic generator's output (regenerate with make-data)."""
    generated = generate_builtin(seed=0)
    for split, df in generated.items():
        committed = load_builtin(split)
        pd.testing.assert_frame_equal(committed, df)
        assert (BUILTIN_DIR / f"{split}.csv").read_text(encoding="utf-8") == df.to_csv(index=False, lineterminator="\n")


def test_builtin_splits_are_disjoint_varied_and_cover_every_attribute():
    splits = {s: load_builtin(s) for s in ("train", "dev", "test")}
    mrs = {s: set(df["mr"]) for s, df in splits.items()}
    assert not (mrs["train"] & mrs["dev"]) and not (mrs["train"] & mrs["test"]) and not (mrs["dev"] & mrs["test"])
    grouped = group_references(splits["train"])
    assert grouped["refs"].map(len).min() >= 2
    seen = collections.Counter(a for mr in splits["train"]["mr"] for a in parse_mr(mr))
    assert set(seen) == set(E2E_ATTRIBUTES)
    with pytest.raises(ValueError, match="built-in split must be one of"):
        load_builtin("validation")


def test_encode_masks_the_prompt_and_keeps_the_reference():
    tok = byte_tokenizer()
    mr, ref = "name[A], area[riverside]", "A is by the river."
    item = encode(tok, mr, ref, seq_len=200)
    prompt = len(tok(mr + SEPARATOR, add_special_tokens=False)["input_ids"])
    assert item["labels"][:prompt] == [IGNORE] * prompt
    assert item["labels"][prompt:] == item["input_ids"][prompt:]
    assert item["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(item["input_ids"][prompt:-1]) == " " + ref
    cut = encode(tok, mr, ref, seq_len=prompt + 3)
    assert len(cut["input_ids"]) == prompt + 3 and cut["labels"][-3:] == cut["input_ids"][-3:]
    with pytest.raises(ValueError, match=r"seq_len=10 leaves no room"):
        encode(tok, mr, ref, seq_len=10)


def test_collator_right_pads_and_masks_padding():
    tok = byte_tokenizer()
    items = [encode(tok, "name[A]", "Short.", 100), encode(tok, "name[Bee]", "A longer one.", 100)]
    b = Collator(tok.pad_token_id)(items)
    n0, n1 = len(items[0]["input_ids"]), len(items[1]["input_ids"])
    assert b["input_ids"].shape == (2, max(n0, n1))
    assert b["attention_mask"][0].tolist() == [1] * n0 + [0] * (n1 - n0)
    assert (b["labels"][0, n0:] == IGNORE).all() and (b["input_ids"][0, n0:] == tok.pad_token_id).all()


def test_iid_partition():
    mrs = load_builtin("train")["mr"]
    parts = partition(mrs, 5, "iid", seed=1)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(mrs)))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == partition(mrs, 5, "iid", seed=1) and parts != partition(mrs, 5, "iid", seed=2)


def test_dirichlet_partition_is_skewed_and_deterministic():
    mrs = list(load_builtin("train")["mr"])
    parts = partition(mrs, 4, "dirichlet", seed=0, alpha=0.3, attribute="area")
    assert sorted(i for p in parts for i in p) == list(range(len(mrs)))
    assert all(parts) and parts == partition(mrs, 4, "dirichlet", seed=0, alpha=0.3, attribute="area")
    share = []
    for p in parts:
        areas = collections.Counter(parse_mr(mrs[i]).get("area", "<none>") for i in p)
        share.append(areas["riverside"] / len(p))
    assert max(share) - min(share) > 0.2  # non-IID: clients see different attribute mixes


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_clients=0), r"num_clients must be an integer in \[1, 10\]"),
    (dict(num_clients=11), r"num_clients must be an integer in \[1, 10\]"),
    (dict(num_clients=2, scheme="zipf"), "'iid' or 'dirichlet'"),
    (dict(num_clients=2, scheme="dirichlet", attribute="colour"), "attribute must be one of"),
    (dict(num_clients=2, scheme="dirichlet", alpha=0), "alpha must be positive"),
])
def test_partition_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        partition(["name[A], area[riverside]"] * 10, **kwargs)
