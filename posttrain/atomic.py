"""Atomic writes: a reader sees the old file or the whole new one, never half of it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


RENAME_EXCHANGE = 2


def publish_dir(tmp_dir: str | Path, final_dir: str | Path) -> None:
    """Put a fully written ``tmp_dir`` in place of ``final_dir``, with no moment where neither exists: an
    older ``final_dir`` is swapped with it in one ``renameat2(RENAME_EXCHANGE)`` and then deleted. Where
    the file system has no exchange, the old one is renamed aside first (``final_dir`` is then missing
    between two renames)."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if not final_dir.exists():
        os.replace(tmp_dir, final_dir)
        return
    if _exchange(tmp_dir, final_dir):
        shutil.rmtree(tmp_dir)  # now the old one
        return
    aside = final_dir.with_name(f".{final_dir.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(final_dir, aside)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(aside)


def _exchange(a: Path, b: Path) -> bool:
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return False
    AT_FDCWD = -100
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(err, f"exchange {a} and {b}: {os.strerror(err)}")


def read_jsonl_appended(path: str | Path) -> list[dict]:
    """The records of a file written by appending one JSON line at a time: a torn last line (a kill in
    the middle of an append) is dropped; a broken line before it is an error naming file and line."""
    from posttrain.errors import UserError

    lines = Path(path).read_text().splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):
                break
            raise UserError(f"{path}:{i}: not a JSON line (the file is damaged)") from None
    return records
