"""E2E-format data: CSV loading, the built-in generated data set, tokenisation, collation, partitioning.

The prompt is the MR followed by a separator; the loss counts only the reference tokens (and the
end-of-text token), never the prompt or the padding.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .io import atomic_write_text, read_text

E2E_ATTRIBUTES = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")
SEPARATOR = "\nDescription:"
IGNORE = -100
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "data" / "builtin"
BUILTIN_SPLITS = ("train", "dev", "test")

_MR_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*(?:,|$)")


def parse_mr(mr: str) -> dict[str, str]:
    """'name[Alimentum], area[city centre]' -> {'name': 'Alimentum', 'area': 'city centre'}."""
    if not isinstance(mr, str) or not mr.strip():
        raise ValueError(f"empty meaning representation: {mr!r}")
    out, pos = {}, 0
    while pos < len(mr):
        match = _MR_ITEM.match(mr, pos)
        if match is None or match.end() == pos:
            raise ValueError(f"cannot parse meaning representation {mr!r} at character {pos}: "
                             "expected attribute[value] items separated by commas")
        out[match.group(1)] = match.group(2).strip()
        pos = match.end()
    return out


def load_e2e(path) -> pd.DataFrame:
    """Rows (mr, ref) of an E2E-format CSV, validated; errors name the file and the row."""
    path = Path(path)
    text = read_text(path, "E2E data file")
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: the file is empty (expected a header with columns 'mr' and 'ref')") from None
    except pd.errors.ParserError as exc:
        raise ValueError(f"{path} is not a readable CSV file: {' '.join(str(exc).split())}") from None
    missing = [c for c in ("mr", "ref") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(df.columns)}, need 'mr' and 'ref'")
    if df.empty:
        raise ValueError(f"{path}: the file has a header but no rows")
    for i, (mr, ref) in enumerate(zip(df["mr"], df["ref"])):
        row = i + 2  # 1-based line number, after the header
        try:
            parse_mr(mr)
        except ValueError as exc:
            raise ValueError(f"{path}, row {row}: {exc}") from None
        if not ref.strip():
            raise ValueError(f"{path}, row {row}: empty reference for MR {mr!r}")
    return df[["mr", "ref"]].reset_index(drop=True)


def group_references(df: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct MR (first-appearance order) with the list of its references."""
    grouped = df.groupby("mr", sort=False)["ref"].apply(list)
    return pd.DataFrame({"mr": grouped.index, "refs": grouped.values})


def load_builtin(split: str = "train") -> pd.DataFrame:
    """The package's own E2E-style data (see `generate_builtin`), as rows (mr, ref)."""
    if split not in BUILTIN_SPLITS:
        raise ValueError(f"built-in split must be one of {BUILTIN_SPLITS}, got {split!r}")
    return load_e2e(BUILTIN_DIR / f"{split}.csv")


# ---- the built-in generator -------------------------------------------------------------------

_VALUES = {
    "name": ["The Copper Kettle", "Blue Lantern", "The Olive Branch", "Saffron House", "The Green Man",
             "Harbour Lights", "The Old Mill", "Juniper", "The Red Fox", "Silver Spoon", "The Wandering Goat",
             "Moonrise", "The Salt Cellar", "Little Fig", "The Crown and Anchor", "Amber Room", "The Lighthouse",
             "Cedar Table", "The Brass Monkey", "Orchard Gate", "The Painted Door", "Marigold", "The Stag",
             "Quayside Kitchen"],
    "eatType": ["coffee shop", "pub", "restaurant"],
    "food": ["English", "French", "Italian", "Indian", "Chinese", "Japanese", "Fast food"],
    "priceRange": ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"],
    "customer rating": ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"],
    "area": ["city centre", "riverside"],
    "familyFriendly": ["yes", "no"],
    "near": ["the Town Hall", "Clifton Bridge", "the Market Square", "St Mary's Church", "the Railway Station",
             "Riverside Park", "the Museum", "the Cinema"],
}


def _a(word: str) -> str:
    return "an" if word[0] in "AEIOUaeiou" else "a"


def _price(v: str, rng) -> str:
    if v in ("cheap", "moderate", "high"):
        return rng.choice([f"has a {v} price range", "is cheap" if v == "cheap" else f"is {v}ly priced",
                           f"has {v} prices"])
    return rng.choice([f"has a price range of {v}", f"costs {v}", f"has prices {v}"])


def _rating(v: str, rng) -> str:
    return rng.choice([f"has {_a(v)} {v} customer rating", f"is rated {v} by customers",
                       f"has a customer rating of {v}"])


def _realise(mr: dict[str, str], rng) -> str:
    """One reference for an MR, with randomly varied wording and clause order."""
    name = mr["name"]
    kind = mr.get("eatType", rng.choice(["place", "venue", "establishment"]))
    food = mr.get("food")
    head = rng.choice([
        f"{name} is {_a(food or kind)} {food + ' ' if food else ''}{kind}",
        f"There is {_a(food or kind)} {food + ' ' if food else ''}{kind} called {name}",
        f"{name} is a {kind}" + (f" serving {food} food" if food else ""),
    ])
    clauses = []
    if "area" in mr:
        clauses.append(rng.choice([f"in the {mr['area']}", f"located in the {mr['area']} area",
                                   f"in the {mr['area']} area"]))
    if "near" in mr:
        clauses.append(rng.choice([f"near {mr['near']}", f"close to {mr['near']}", f"not far from {mr['near']}"]))
    location = " ".join(clauses)
    facts = []
    if "priceRange" in mr:
        facts.append(_price(mr["priceRange"], rng))
    if "customer rating" in mr:
        facts.append(_rating(mr["customer rating"], rng))
    if "familyFriendly" in mr:
        yes = mr["familyFriendly"] == "yes"
        facts.append(rng.choice(["is family friendly", "welcomes children", "is kid friendly"] if yes else
                                ["is not family friendly", "does not welcome children", "is not kid friendly"]))
    rng.shuffle(facts)
    sentence = head + (f" {location}" if location else "")
    if not facts:
        return sentence + "."
    if len(facts) == 1 or rng.random() < 0.5:
        joined = facts[0] if len(facts) == 1 else ", ".join(facts[:-1]) + " and " + facts[-1]
        there_is = sentence.startswith("There is")
        return f"{sentence}. It {joined}." if there_is or rng.random() < 0.5 else f"{sentence} and {joined}."
    return f"{sentence}. It {facts[0]}. " + " ".join(
        f"It is also {f[3:]}." if f.startswith("is ") else f"It also {f}." for f in facts[1:])


def _random_mr(rng) -> dict[str, str]:
    others = [a for a in E2E_ATTRIBUTES if a != "name"]
    chosen = set(rng.sample(others, rng.randint(2, len(others))))
    return {a: rng.choice(_VALUES[a]) for a in E2E_ATTRIBUTES if a == "name" or a in chosen}


def format_mr(mr: dict[str, str]) -> str:
    return ", ".join(f"{k}[{v}]" for k, v in mr.items())


def generate_builtin(seed: int = 0, mrs: dict[str, int] | None = None, refs_per_mr: tuple[int, int] = (3, 6)
                     ) -> dict[str, pd.DataFrame]:
    """Deterministic E2E-style data: distinct MRs per split, several varied references each."""
    import random

    rng = random.Random(seed)
    mrs = mrs or {"train": 500, "dev": 60, "test": 60}
    seen: set[str] = set()
    out = {}
    for split, count in mrs.items():
        rows = []
        while len(rows) == 0 or len({r[0] for r in rows}) < count:
            mr = _random_mr(rng)
            text = format_mr(mr)
            if text in seen:
                continue
            seen.add(text)
            refs: list[str] = []
            for _ in range(50):
                ref = _realise(mr, rng)
                if ref not in refs:
                    refs.append(ref)
                if len(refs) >= rng.randint(*refs_per_mr):
                    break
            rows += [(text, ref) for ref in refs]
        out[split] = pd.DataFrame(rows, columns=["mr", "ref"])
    return out


def write_builtin(directory=BUILTIN_DIR, seed: int = 0) -> list[Path]:
    """Regenerate data/builtin/{train,dev,test}.csv (atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, df in generate_builtin(seed).items():
        path = directory / f"{split}.csv"
        atomic_write_text(path, df.to_csv(index=False, lineterminator="\n"))
        paths.append(path)
    return paths


# ---- tokenisation, collation, partitioning ---------------------------------------------------

def encode(tokenizer, mr: str, ref: str, seq_len: int) -> dict[str, list[int]]:
    """Token ids of prompt + reference + EOS (cut to seq_len) and labels masking the prompt."""
    prompt = tokenizer(mr + SEPARATOR, add_special_tokens=False)["input_ids"]
    target = tokenizer(" " + ref, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt) >= seq_len:
        raise ValueError(f"seq_len={seq_len} leaves no room for the reference: the prompt of MR {mr!r} "
                         f"already has {len(prompt)} tokens; use seq_len > {len(prompt)}")
    ids = (prompt + target)[:seq_len]
    labels = ([IGNORE] * len(prompt) + target)[:seq_len]
    return {"input_ids": ids, "labels": labels}


class E2EDataset(torch.utils.data.Dataset):
    """(mr, ref) rows tokenised once, for training and for reference-only PPL."""

    def __init__(self, df: pd.DataFrame, tokenizer, seq_len: int = 64):
        self.df = df.reset_index(drop=True)
        self.items = [encode(tokenizer, mr, ref, seq_len) for mr, ref in zip(df["mr"], df["ref"])]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


class Collator:
    """Right-pads a list of encoded examples to the longest one in the batch."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            ids[i, :n] = torch.tensor(it["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(it["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loader(dataset, tokenizer, batch_size: int, shuffle: bool = False, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       collate_fn=Collator(tokenizer.pad_token_id))


def partition(mrs, num_clients: int, scheme: str = "iid", seed: int = 0, alpha: float = 0.5,
              attribute: str = "eatType", max_draws: int = 100) -> list[list[int]]:
    """Split example indices over clients: IID (shuffled, even sizes) or non-IID (Dirichlet(alpha) per
    value of an MR attribute). Deterministic by seed; every client gets at least one example."""
    mrs = list(mrs)
    n = len(mrs)
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or not 1 <= num_clients <= n:
        raise ValueError(f"num_clients must be an integer in [1, {n}] for {n} examples, got {num_clients!r}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [sorted(part.tolist()) for part in np.array_split(rng.permutation(n), num_clients)]
    if scheme != "dirichlet":
        raise ValueError(f"partition scheme must be 'iid' or 'dirichlet', got {scheme!r}")
    if attribute not in E2E_ATTRIBUTES:
        raise ValueError(f"attribute must be one of {E2E_ATTRIBUTES}, got {attribute!r}")
    if not alpha > 0:
        raise ValueError(f"Dirichlet alpha must be positive, got {alpha!r}")
    groups: dict[str, list[int]] = {}
    for i, mr in enumerate(mrs):
        groups.setdefault(parse_mr(mr).get(attribute, "<none>"), []).append(i)
    for _ in range(max_draws):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for key in sorted(groups):
            idx = rng.permutation(groups[key])
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients))[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k] += chunk.tolist()
        if all(parts):
            return [sorted(p) for p in parts]
    raise ValueError(f"Dirichlet(alpha={alpha}) over {attribute!r} left a client empty in {max_draws} draws; "
                     "use a larger alpha or fewer clients")
