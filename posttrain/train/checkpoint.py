"""Training checkpoints: written whole to a temporary directory, then renamed into place; and what an
existing ``output_dir`` means for a new run (``resume_point``: resume, refuse, or start over).

``output_dir/checkpoints/checkpoint-N/`` holds the model (a ``save_pretrained`` directory, or the
LoRA adapter), ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pt`` and ``trainer_state.json``
(step, epoch, config hash, global batch, ``parallel``, processes). Under a sharded layout the model
and optimizer state are instead every process's shards (``sharded/`` for FSDP, ``deepspeed/``;
posttrain.train.parallel), beside the model's ``config.json`` and the tokenizer. A crash while
writing leaves only a ``.tmp-*`` directory, which is never taken for a checkpoint and is removed by
the next save.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from posttrain.atomic import publish_dir, read_jsonl_appended, write_text
from posttrain.config_io import config_hash, world_size
from posttrain.errors import UserError
from posttrain.util import checkpoints


def latest(output_dir: str | Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def _rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2], "numpy": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": pos, "numpy_gauss": [has_gauss, gauss], "torch": torch.get_rng_state()}


def _set_rng_state(s: dict) -> None:
    random.setstate((s["python_version"], tuple(s["python"]), s["python_gauss"]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], *s["numpy_gauss"]))
    torch.set_rng_state(s["torch"])


def save(output_dir: str | Path, step: int, model, tokenizer, optimizer, scheduler, state: dict, limit: int,
         extra_models: dict | None = None) -> Path:
    """Write checkpoint ``step`` atomically and keep at most ``limit`` (0: all) complete ones.
    ``extra_models`` (name -> model, e.g. PPO's value model) are saved in subdirectories."""
    tmp = _fresh_tmp(output_dir, step)
    model.save_pretrained(tmp)
    for name, extra in (extra_models or {}).items():
        extra.save_pretrained(tmp / name)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    return _publish(output_dir, tmp, step, tokenizer, scheduler, state, limit)


def save_sharded(output_dir: str | Path, step: int, write: Callable[[Path], None], model, tokenizer, scheduler,
                 state: dict, limit: int, is_main: bool) -> None:
    """A checkpoint of a sharded layout (posttrain.train.parallel): called by every process. Each writes
    its shards of the model and optimizer state (``write(directory)``, collective); process 0 adds the
    model's config, tokenizer, scheduler, RNG and state, and publishes the directory once every shard
    is written."""
    import torch.distributed as dist

    tmp = Path(output_dir) / "checkpoints" / f".tmp-checkpoint-{step}"
    if is_main:
        _fresh_tmp(output_dir, step, tmp)
    dist.barrier()
    write(tmp)
    dist.barrier()
    if is_main:
        model.config.save_pretrained(tmp)
        _publish(output_dir, tmp, step, tokenizer, scheduler, state, limit)
    dist.barrier()


def _fresh_tmp(output_dir: str | Path, step: int, tmp: Path | None = None) -> Path:
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if tmp is None:
        return Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-checkpoint-{step}-"))
    tmp.mkdir()
    return tmp


def _publish(output_dir: str | Path, tmp: Path, step: int, tokenizer, scheduler, state: dict, limit: int) -> Path:
    tokenizer.save_pretrained(tmp)
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    final = Path(output_dir) / "checkpoints" / f"checkpoint-{step}"
    publish_dir(tmp, final)
    if limit > 0:
        for old in checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(model, ckpt: Path) -> None:
    """Load a checkpoint's trainable weights into ``model`` (a plain transformers model or a peft one)."""
    from safetensors.torch import load_file

    adapter = ckpt / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
        return
    state = {}
    for f in sorted(ckpt.glob("model*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    shared = {name for name, p in model.named_parameters(remove_duplicate=False)
              if any(p is q for n2, q in model.named_parameters() if n2 in state)}
    if unexpected or set(missing) - shared:
        raise RuntimeError(f"{ckpt}: checkpoint does not match the model (missing {missing}, unexpected {unexpected})")


def load_state(ckpt: Path, scheduler) -> dict:
    """The scheduler and RNG state of a checkpoint (every layout); returns its trainer state."""
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(ckpt / "rng_state.pt", weights_only=True))
    return read_state(ckpt)


def resume_point(cfg, is_main: bool) -> Path | None:
    """Decide what to do with an existing ``output_dir`` (a ``TrainConfig``'s): returns the checkpoint to
    resume from (None: start fresh; with ``overwrite_output_dir`` process 0 deletes the directory).
    Raises ``UserError`` when it holds a different run (the global batch counts: see
    ``config.semantic``) and ``overwrite_output_dir`` is not set, or a checkpoint of the other
    ``parallel`` layout."""
    out = Path(cfg.output_dir)
    want = config_hash(cfg)
    manifest = out / "manifest.json"
    if cfg.overwrite_output_dir:
        if is_main and out.exists():
            shutil.rmtree(out)
        return None
    if manifest.is_file():
        have = json.loads(manifest.read_text()).get("config_hash")
        if have != want:
            raise UserError(f"{out}: holds a finished run with a different config; "
                            "set overwrite_output_dir=true or choose another output_dir")
        return None
    last = latest(out)
    if last is None:
        return None
    state = read_state(last)
    if state.get("config_hash") != want:
        batch = state.get("global_batch_size")
        hint = (f" (its global batch is {batch}, this run's {global_batch_size(cfg)}: set per_device_train_batch_size x "
                "gradient_accumulation_steps x processes to match)" if batch and batch != global_batch_size(cfg) else "")
        raise UserError(f"{last}: checkpoint of a run with a different config{hint}; "
                        "set overwrite_output_dir=true or choose another output_dir")
    if state.get("parallel", "ddp") != cfg.parallel:
        raise UserError(f"{last}: written with parallel: {state.get('parallel', 'ddp')}; resume it with the same "
                        "setting, or set overwrite_output_dir=true")
    return last


def global_batch_size(cfg) -> int:
    """per-device batch x accumulation x processes."""
    return cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size()


def trim_metrics(path: Path, upto: int) -> None:
    if not path.is_file():
        return
    keep = [r for r in read_jsonl_appended(path) if r.get("step", 0) <= upto]  # a torn last line dropped
    write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
