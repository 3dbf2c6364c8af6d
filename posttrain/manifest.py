"""``manifest.json``: what a stage ran with and what came out (provenance for every checkpoint)."""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path

import posttrain
from posttrain.config_io import config_hash, to_dict


def git_revision() -> str | None:
    """The git revision of the posttrain source tree, when it runs from a checkout."""
    root = Path(posttrain.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def library_versions() -> dict:
    import torch
    import transformers

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("accelerate", "peft", "datasets"):
        mod = sys.modules.get(name)
        if mod is not None:
            versions[name] = getattr(mod, "__version__", "?")
    return versions


def build(stage: str, cfg, *, data: list[dict], data_stats: dict, metrics: dict, started: float, **extra) -> dict:
    """``model_license`` is the license of the model the stage started from (posttrain.models.license_of:
    an alias's, or the lineage a trained model's own manifest recorded); ``licenses`` those of its data."""
    from posttrain.models import license_of

    licenses = sorted({str(s["license"]) for s in data if s.get("license")} | (
        {"unknown"} if any(not s.get("license") for s in data) else set()))
    return {
        "stage": stage,
        "posttrain_version": posttrain.__version__,
        "git_revision": git_revision(),
        "config": to_dict(cfg),
        "config_hash": config_hash(cfg),
        "model_license": license_of(cfg.model),
        "data": data,
        "licenses": licenses,
        "data_stats": data_stats,
        "metrics": metrics,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 2),
        "platform": platform.platform(),
        "versions": library_versions(),
        **extra,
    }
