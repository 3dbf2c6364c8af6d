"""How a model is spread over processes, and the checkpoints and full weights that go with it.

``parallel: ddp`` (default): accelerate's DistributedDataParallel. Every process holds the whole
model, its gradient and the AdamW state (``16 P`` bytes in float32 for ``P`` parameters); gradients are
averaged once per step. Checkpoints are a ``save_pretrained`` directory plus ``optimizer.pt``
(posttrain.train.checkpoint), written by process 0.

``parallel: fsdp``: torch's FSDP2 (``torch.distributed.fsdp.fully_shard``). Every decoder layer (the
classes a transformers model names in ``_no_split_modules``) is one unit, the rest (embeddings, final
norm, head) is the root unit. Each process holds a dim-0 shard of every parameter, of its gradient and
of its AdamW state, ``16 P / N`` bytes for ``N`` processes; a unit's parameters are all-gathered for its
forward and backward and freed after them (``fsdp_reshard_after_forward: false`` keeps them from the
forward to the backward: fewer all-gathers, more memory), gradients are reduce-scattered after every
micro-batch. ``fsdp_cpu_offload`` keeps the shards, their gradients and the optimizer step in CPU
memory (on a machine without an accelerator, where they are already, it changes nothing). Gradient
checkpointing composes with both. A single process with ``fsdp`` forms a group of one (on a GPU: CPU
offload for a model whose optimizer state does not fit).

Checkpoints under ``fsdp`` go through ``torch.distributed.checkpoint`` (DCP): every process writes its
own shards of the model and optimizer state into ``checkpoint-N/sharded/`` and DCP reads them back for
any number of processes (it reshards on load), so a run written by N processes resumes on M. The final
model is gathered once (``full_state_dict``) and saved by process 0 as a normal ``save_pretrained``
directory. Anything that needs the whole model on one process (the transformers rollout engine, a
weight push to vLLM, the in-run evaluation) gets a gathered copy (``full_copy``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

SHARDED_DIR = "sharded"  # a checkpoint's DCP directory


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group; a single process without a launcher gets a group of one."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


def layer_classes(module: nn.Module) -> set[str]:
    """The class names transformers marks as never to be split (decoder layers) in every model inside."""
    return {name for m in module.modules() for name in (getattr(m, "_no_split_modules", None) or ())}


def shard(module: nn.Module, device: torch.device, reshard_after_forward: bool = True,
          cpu_offload: bool = False) -> nn.Module:
    """Apply FSDP2 in place: one unit per decoder layer, then the root. A module listing
    ``shard_parts`` (PPO's policy + value) gets one root per part, so each part runs on its own."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if cpu_offload and device.type != "cpu":  # on a CPU-only machine the shards are in CPU memory already
        kwargs["offload_policy"] = CPUOffloadPolicy()
    layers = layer_classes(module)
    if not layers:
        raise ValueError(f"fsdp: {type(module).__name__} names no decoder layer classes (_no_split_modules)")
    for m in list(module.modules()):
        if type(m).__name__ in layers:
            fully_shard(m, **kwargs)
    for root in [getattr(module, p) for p in getattr(module, "shard_parts", ())] or [module]:
        fully_shard(root, **kwargs)
    return module


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every entry of ``model.state_dict()`` as a whole CPU tensor. Sharded entries are all-gathered, so
    every process must call this, in the same order."""
    from torch.distributed.tensor import DTensor

    return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu")
            for name, t in model.state_dict().items()}


def full_copy(model: nn.Module, into: nn.Module | None = None) -> nn.Module:
    """A plain (unsharded) model with ``model``'s current weights, on the CPU: ``into`` updated in place
    when given (an engine holding it sees the new weights), else a new model of the same class and
    config. Every process must call this."""
    state = full_state_dict(model)
    if into is None:
        into = type(model)(model.config).to(next(iter(state.values())).dtype)
        if getattr(model, "generation_config", None) is not None:
            into.generation_config = model.generation_config
        into.eval()
    missing, unexpected = into.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k not in state]:
        raise RuntimeError(f"full_copy: state does not match the model (missing {missing}, unexpected {unexpected})")
    return into


def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm (over every shard of every process) and return it."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def local_state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this process holds (its shards under FSDP)."""
    from torch.distributed.tensor import DTensor

    def size(t) -> int:
        if not isinstance(t, torch.Tensor):
            return 0
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = {id(p): p for p in module.parameters()}.values()
    return {"params_bytes": sum(size(p) for p in params),
            "grads_bytes": sum(size(p.grad) for p in params if p.grad is not None),
            "optimizer_bytes": sum(size(v) for s in optimizer.state.values() for v in s.values())}


def save_sharded(path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of the model and optimizer state under ``path`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))


def load_sharded(path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read the model and optimizer state written by ``save_sharded`` (by any number of processes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
