"""A run folder that knows what it holds: the config and the content hashes of the data its results came from.

A stopped run resumes in its folder only with the same config and the same data files; the refusal names
the fields and files that differ. A folder without results can always be reused. config.json and
fingerprint.json are written when training starts, so a start that fails earlier leaves nothing behind.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from .config import ConfigError, ExperimentConfig
from .data import BUILTIN_DIR, BUILTIN_SPLITS
from .io import FileFormatError, atomic_write_json, atomic_write_text, read_mapping

RESULT_FILES = ("results.csv", "clients.csv", "metrics.csv", "reconfigurations.csv")


class RunFolderError(ValueError):
    """An output folder that cannot take this run; the message says why and what to do."""


def data_files(cfg: ExperimentConfig) -> dict[str, Path]:
    """The files a run's data comes from, by the name they are recorded under."""
    if cfg.data == "builtin":
        return {f"builtin/{s}.csv": BUILTIN_DIR / f"{s}.csv" for s in BUILTIN_SPLITS}
    return {name: Path(cfg.data) / name for name in ("devset.csv", "testset_w_refs.csv")}


def data_hashes(cfg: ExperimentConfig) -> dict[str, str]:
    """sha256 of every data file's content."""
    return {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in data_files(cfg).items()}


def config_differences(old: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """`field: old -> new` for every field but the method list."""
    a, b = old.to_dict(), new.to_dict()
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if k != "methods" and a[k] != b[k]]


class RunFolder:
    """An experiment's output folder: its fingerprint, its results and the checks before a resume."""

    def __init__(self, path, cfg: ExperimentConfig):
        self.path, self.cfg = Path(path), cfg
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"output folder {self.path} is a file; choose a folder (--out)")
        self.hashes = data_hashes(cfg)
        self.recorded = False
        self._methods_before: list[str] = []

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def has_results(self) -> bool:
        rows = any(len(r) for r in self.read())
        return rows or any(self.checkpoints.glob("*.pt"))

    def check(self) -> None:
        """Refuse a folder whose results came from another config or other data (naming what differs), or
        whose results have lost their config.json."""
        if not self.path.is_dir() or not self.has_results():
            return
        saved = self.path / "config.json"
        if not saved.is_file():
            raise RunFolderError(f"{self.path} holds results but no config.json, so what they were measured with is "
                                 "unknown; restore config.json or choose another output folder")
        try:
            previous = ExperimentConfig.load(saved)
        except (ConfigError, FileFormatError) as exc:
            raise RunFolderError(f"{self.path} holds results whose config.json cannot be read ({exc}); "
                                 "choose another output folder") from None
        data_changes, known = self._data_differences()
        changed = [d for d in config_differences(previous, self.cfg)  # the same files under another path are fine
                   if not (d.startswith("data:") and known and not data_changes and "builtin" not in d)]
        changed += data_changes
        if changed:
            raise RunFolderError(f"{self.path} holds results of a different setting ({'; '.join(changed)}); "
                                 "resume with the same config and data, or choose another output folder")
        self._methods_before = previous.methods
        self.record()  # training went on here before: the method list grows, the fingerprint is kept current

    def data_differences(self) -> list[str]:
        """What changed in the data files since the folder recorded them (nothing when it never did)."""
        return self._data_differences()[0]

    def _data_differences(self) -> tuple[list[str], bool]:
        """What changed in the data files, and whether the folder knew their hashes at all."""
        path = self.path / "fingerprint.json"
        if not path.is_file():  # a folder from before fingerprints: its data is recorded from now on
            return [], False
        before = read_mapping(path, "run fingerprint").get("data_files", {})
        names = sorted(set(before) | set(self.hashes))
        return [f"data file {n} changed" if n in before and n in self.hashes else f"data file {n} added or removed"
                for n in names if before.get(n) != self.hashes.get(n)], True

    def record(self) -> None:
        """Training starts: write config.json (methods so far and now) and the data fingerprint."""
        methods = list(dict.fromkeys(self._methods_before + self.cfg.methods))
        cfg = self.cfg.replace(methods=methods)
        atomic_write_json(self.path / "config.json", cfg.to_dict())
        atomic_write_json(self.path / "fingerprint.json", {"config": cfg.fingerprint(), "data_files": self.hashes,
                                                           "data": self.cfg.data})
        self.recorded = True

    def read(self) -> tuple[list, list, list, list]:
        """The rows already written: results, clients, metrics, reconfigurations (a file that cannot be read is
        named)."""
        return tuple(self._read(name) for name in RESULT_FILES)

    def _read(self, name: str) -> list[dict]:
        path = self.path / name
        try:
            df = pd.read_csv(path)
        except (FileNotFoundError, pd.errors.EmptyDataError):
            return []
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
            raise RunFolderError(f"{path} cannot be read as results ({' '.join(str(exc).split())[:200]}); "
                                 "choose another output folder") from None
        if name in ("results.csv", "clients.csv") and not {"method", "round"} <= set(df.columns):
            raise RunFolderError(f"{path} does not hold results (no 'method' and 'round' columns); "
                                 "choose another output folder")
        if "reasons" in df:  # an empty string reads back as NaN
            df["reasons"] = df["reasons"].astype(object).where(df["reasons"].notna(), "")
        return df.to_dict("records")

    def write(self, rows, client_rows, metrics, reconfigurations=()) -> None:
        """Every result file, atomically (config.json first if training has just started, or again if the folder
        was deleted under the run: what is written stays a folder that can be resumed)."""
        if not self.recorded or not (self.path / "config.json").is_file():
            self.record()
        for name, data in zip(RESULT_FILES, (rows, client_rows, metrics, list(reconfigurations))):
            atomic_write_text(self.path / name, pd.DataFrame(data).to_csv(index=False))
