"""The floor every layer may import: progress lines, cache paths, model fingerprints, checkpoint names."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def log(msg: str) -> None:
    """A progress line on stderr, from the main process only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr, flush=True)


def cache_root() -> Path:
    """``$POSTTRAIN_CACHE``, default ``~/.cache/posttrain``: converted models, reference log-probs."""
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def model_fingerprint(path: str) -> str:
    """A local model directory's resolved path with the names, sizes and modification times of its
    files; for anything else (a hub id) the name itself."""
    p = Path(path)
    if not p.is_dir():
        return hashlib.sha256(f"hub:{path}".encode()).hexdigest()[:16]
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file())
    return hashlib.sha256(json.dumps([str(p.resolve()), files]).encode()).hexdigest()[:16]


def checkpoints(output_dir: str | Path) -> list[Path]:
    """A run's complete checkpoints (``checkpoints/checkpoint-N`` with a ``trainer_state.json``), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := CHECKPOINT_NAME.match(p.name)) and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]
