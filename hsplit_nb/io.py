"""Atomic file writes: write a temporary file beside the target, then rename it over the target."""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

import yaml


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_whole_csv(path):
    """A CSV table that was written whole: it ends with a line break and every row has the header's fields;
    otherwise (a file cut short or damaged) a ValueError names the file and the first bad line."""
    import csv
    import io

    import pandas as pd
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    bad = [] if text.endswith("\n") and rows else [len(rows)]
    bad += [k + 1 for k, row in enumerate(rows) if len(row) != len(rows[0])]
    if bad:
        raise ValueError(f"{path}: not a whole table (row {min(bad)} of {len(rows)} is cut short or has another "
                         "number of fields than the header); it was damaged or is still being written; write the "
                         "report again (--report-only)")
    return pd.read_csv(io.StringIO(text))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def strict_json(obj):
    """`obj` with every non-finite float as None, so the JSON written is strict (no NaN, no Infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def atomic_write_json(path, obj) -> Path:
    """Strict JSON (non-finite numbers become null), written atomically."""
    text = json.dumps(strict_json(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    return atomic_write_text(path, text + "\n")


class FileFormatError(ValueError):
    """A file that cannot be read as what it should be; the message names the file."""


def read_text(path, what: str = "file") -> str:
    """The UTF-8 text of `path`, or an error naming the file (missing, a folder, binary, not UTF-8)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_file():
        raise FileFormatError(f"{what} {path} is not a file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                              "is it a binary file?") from None
    if "\x00" in text:
        raise FileFormatError(f"{what} {path} holds NUL bytes; is it a binary file?")
    return text


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 numbers (`1e-3` and `8e6` are floats, as a reader expects) and
    duplicate keys refused (YAML 1.1 would read `1e-3` as a string and keep the last of two keys)."""


_FLOAT_12 = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
_Yaml12Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                         for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def _mapping_without_duplicates(loader, node, deep=False):
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise FileFormatError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        keys.add(key)
    return loader.construct_mapping(node, deep)


_Yaml12Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _pairs_without_duplicates(pairs):
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise FileFormatError(f"duplicate key(s) {dup}")
    return dict(pairs)


def read_value(text: str):
    """One YAML 1.2 scalar or flow value as written on a command line (`2e6`, `[0.3, 0.6]`, `null`, `fast`)."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError:
        return text


def read_mapping(path, what: str = "config file") -> dict:
    """A YAML (.yaml/.yml) or JSON file holding one mapping; every failure names the file and the place."""
    path = Path(path)
    text = read_text(path, what)
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.load(text, Loader=_Yaml12Loader)
        else:
            data = json.loads(text, object_pairs_hook=_pairs_without_duplicates)
    except FileFormatError as exc:
        raise FileFormatError(f"{what} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise FileFormatError(f"{what} {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise FileFormatError(f"{what} {path}: expected a mapping of fields, got {type(data).__name__}")
    return data


class FolderLocked(RuntimeError):
    """Another live process writes into this folder; the message names it."""


class FolderLock:
    """One writer per folder: an exclusive `flock` on `<folder>/.lock`, held while the context is open and released
    by the kernel when the process ends however it ends (so a lock is never left stale by a killed run). The file
    keeps the holder's pid and command line for the message a second writer gets."""

    def __init__(self, folder, what: str = "output folder"):
        self.path, self.what, self._fd = Path(folder) / ".lock", what, None

    def __enter__(self) -> "FolderLock":
        import fcntl
        import sys

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderLocked(f"{self.what} {self.path.parent} is in use by {holder}; wait for it to end, or stop "
                               "it, before writing there again") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} ({' '.join(sys.argv)[:300]})".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        folder = self.path.parent
        if [p.name for p in folder.iterdir()] == [".lock"]:  # a start that failed leaves nothing behind
            self.path.unlink()
            folder.rmdir()
        os.close(self._fd)  # closing the descriptor releases the lock
        self._fd = None


def torch_bytes(obj) -> bytes:
    """`obj` as torch.save writes it (for an atomic write of a checkpoint or a state)."""
    import io

    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
