"""Read raw records from local files (.jsonl, .json, .parquet, each optionally .gz) or the hub.

``read_records`` yields ``(record, where)`` pairs, where ``where`` is what an error message should
name: ``path:line`` for JSON Lines, ``path record i`` for JSON and parquet, ``hub_id[split] record i``
for hub datasets (loaded through ``datasets``).

``split`` may slice records as ``datasets`` does: ``train[:7000]``, ``train[7000:]``, ``train[100:200]``.
The hub applies it itself; a local file (which is its own one split) keeps that range of its records,
counted from 0 over the non-blank records, so a recipe can train on a file's head and evaluate on its tail.
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path

from posttrain.errors import UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def _open_text(path: Path):
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    return raw


def _base_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def _decode(line: bytes, where: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte {e.start}: {line[e.start:e.start + 1]!r})") from None


_SLICE = re.compile(r"^\w+(?:\[(-?\d*):(-?\d*)\])?$")


def record_range(split: str, path: str) -> tuple[int, int | None]:
    """``(start, stop)`` of a split like ``train[:7000]`` (``(0, None)`` for a plain split name)."""
    m = _SLICE.match(split.replace(" ", ""))
    if m is None or any(b.startswith("-") for b in m.groups() if b):
        raise UserError(f"{path}: split {split!r}: a local file takes a plain name or a record range such as "
                        "train[:7000] or train[7000:] (non-negative record numbers)")
    start, stop = m.groups()
    return int(start or 0), (int(stop) if stop else None)


def read_records(path: str, split: str = "train", name: str | None = None) -> Iterator[tuple[dict, str]]:
    p = Path(path)
    if p.is_file():
        suffix = _base_suffix(p)
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
        if suffix not in readers:
            raise UserError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)} (optionally .gz)")
        start, stop = record_range(split, path)
        yield from itertools.islice(readers[suffix](p), start, stop)
    elif p.is_dir():
        yield from _read_hub(str(p), split, name)
    elif path.startswith((".", "/", "~")) or p.suffix in LOCAL_SUFFIXES + (".gz",) or path.count("/") != 1:
        raise UserError(f"{path}: file not found")
    else:
        yield from _read_hub(path, split, name)


def _read_jsonl(path: Path) -> Iterator[tuple[dict, str]]:
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                where = f"{path}:{lineno}"
                text = _decode(line, where).strip()
                if not text:
                    continue
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
                yield rec, where
    except (gzip.BadGzipFile, EOFError) as e:
        raise UserError(f"{path}: not a readable gzip file ({e})") from None


def _read_json(path: Path) -> Iterator[tuple[dict, str]]:
    try:
        with _open_text(path) as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError) as e:
        raise UserError(f"{path}: not a readable gzip file ({e})") from None
    text = _decode(raw, str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}})")
    for i, rec in enumerate(data):
        where = f"{path} record {i}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        yield rec, where


def _read_parquet(path: Path) -> Iterator[tuple[dict, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    for i, rec in enumerate(table.to_pylist()):
        yield rec, f"{path} record {i}"


def _read_hub(path: str, split: str, name: str | None) -> Iterator[tuple[dict, str]]:
    import datasets

    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # network, missing dataset, missing split: all user-facing
        raise UserError(f"{path}: could not load dataset (split {split!r}): {type(e).__name__}: {e}") from None
    for i, rec in enumerate(ds):
        yield rec, f"{path}[{split}] record {i}"
