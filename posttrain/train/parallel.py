"""How a model is spread over processes (``parallel``), and the checkpoints and whole weights that go with it.

The loop asks a layout for five things and never looks at which one it has: wrap the module and its
optimizer (``prepare``), the context and the function of a micro-batch's backward (``accumulating``,
``backward`` and ``loss_scale``), make an update (``step``: clip, optimizer step, zero the gradients;
returns the gradient norm), write and read checkpoints, and hand out the whole model (``whole``: for
generation, evaluation and the final save).

``ddp`` (default): accelerate's DistributedDataParallel. Every process holds the whole model, its
gradient and the AdamW state (``16 P`` bytes in float32 for ``P`` parameters); gradients are averaged
once per step. Checkpoints: a ``save_pretrained`` directory plus ``optimizer.pt``, by process 0.

``fsdp``: torch's FSDP2 (``torch.distributed.fsdp.fully_shard``). Every decoder layer (the classes a
transformers model names in ``_no_split_modules``) is one unit, the rest (embeddings, final norm,
head) is the root unit. Each process holds a dim-0 shard of every parameter, of its gradient and of
its AdamW state, ``16 P / N`` bytes for ``N`` processes; a unit's parameters are all-gathered for its
forward and backward and freed after them (``fsdp_reshard_after_forward: false`` keeps them from the
forward to the backward: fewer all-gathers, more memory), gradients are reduce-scattered after every
micro-batch. ``fsdp_cpu_offload`` keeps the shards, their gradients and the optimizer step in CPU
memory (on a machine without an accelerator, where they are already, it changes nothing). A single
process with ``fsdp`` forms a group of one. Checkpoints go through ``torch.distributed.checkpoint``
(DCP): every process writes its own shards of the model and optimizer state into
``checkpoint-N/sharded/``, and DCP reads them back for any number of processes (it reshards on load).

``deepspeed``: DeepSpeed ZeRO (``deepspeed_zero_stage`` 2: gradients and optimizer state partitioned,
3: parameters too) around the loop's own AdamW, which then steps on each process's flat fp32
partition. DeepSpeed keeps that fp32 partition as a master copy beside the module's parameters, so a
process holds ``(4 + 16 / N) P`` bytes under ZeRO-2 and ``(4 + 16) P / N`` under ZeRO-3 in float32
(ZeRO is made for 16-bit parameters over fp32 masters). Checkpoints: DeepSpeed's own
(``checkpoint-N/deepspeed/``, every process writes its partitions); they resume on the number of
processes that wrote them.

Gradient checkpointing composes with every layout. The loss convention is the loop's: each
micro-batch's loss is already a share of the global mean, so every layout scales it back from the
average it takes over processes (and DeepSpeed from its division by the accumulation steps).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from posttrain.errors import UserError
from posttrain.train import checkpoint

SHARDED_DIR = "sharded"  # an FSDP checkpoint's DCP directory
DEEPSPEED_DIR = "deepspeed"  # a DeepSpeed checkpoint's directory


def layout(cfg, accelerator) -> DDP | FSDP | DeepSpeed:
    """The layout ``cfg.parallel`` names. An accelerate config that shards on its own (FSDP or DeepSpeed
    set in ``accelerate config``; on GPUs) is refused: the loop's checkpoints and gathers would not know."""
    kind = accelerator.distributed_type.name
    if kind in ("FSDP", "DEEPSPEED"):
        raise UserError(f"accelerate config: distributed_type {kind} is not used by posttrain; launch with a plain "
                        "multi-process config and set parallel in the posttrain config (docs/distributed.md)")
    return {"ddp": DDP, "fsdp": FSDP, "deepspeed": DeepSpeed}[cfg.parallel](cfg, accelerator)


def size_of(t) -> int:
    """Bytes of a tensor this process holds (a DTensor's local shard)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, torch.Tensor):
        return 0
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def copy_into(into: nn.Module | None, items) -> nn.Module | None:
    """Copy ``(name, whole tensor)`` pairs into ``into``'s state in place (``into`` None: only consume them)."""
    target = into.state_dict() if into is not None else {}
    for name, whole in items:
        if into is not None:
            if name not in target:
                raise RuntimeError(f"whole copy: {name} is not a weight of {type(into).__name__}")
            target[name].copy_(whole.detach())
    return into


def new_like(model: nn.Module) -> nn.Module:
    """An unsharded model of ``model``'s class, config and dtype (weights to be copied in), in eval mode."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    into = type(model)(model.config).to(dtype)
    if getattr(model, "generation_config", None) is not None:
        into.generation_config = model.generation_config
    return into.eval()


class DDP:
    """Each process holds everything; accelerate's DDP wrapper averages the gradients."""

    sharded = False

    def __init__(self, cfg, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.memory: dict[str, int] = {}
        # the loop runs ``backward`` on ``loss * loss_scale``: the loss is a share of the global mean,
        # and DDP (and FSDP) average the gradient over processes
        self.backward = accelerator.backward
        self.loss_scale = accelerator.num_processes

    def prepare(self, module: nn.Module, make_optimizer: Callable) -> tuple[nn.Module, torch.optim.Optimizer]:
        optimizer = make_optimizer(module)
        self.module, self.optimizer = self.accelerator.prepare(module, optimizer)
        return self.module, self.optimizer

    def accumulating(self, last: bool):
        """The context of one micro-batch's forward and backward (``last``: the update's final one)."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.module)

    def step(self, params: list[torch.Tensor]) -> float | None:
        norm = self.clip(params) if self.cfg.max_grad_norm > 0 else None
        self.optimizer.step()
        self.memory = self.memory or self.state_bytes()  # after the first update every state exists
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def clip(self, params: list[torch.Tensor]) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))

    def state_bytes(self) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer state this process holds."""
        params = {id(p): p for p in self.module.parameters()}.values()
        return {"params_bytes": sum(size_of(p) for p in params),
                "grads_bytes": sum(size_of(p.grad) for p in params if p.grad is not None),
                "optimizer_bytes": sum(size_of(v) for s in self.optimizer.state.values() for v in s.values())}

    def whole(self, model: nn.Module, into: nn.Module | None = None, keep: bool = True) -> nn.Module | None:
        """``model`` with whole weights (every process calls this; ``keep=False``: None where it is not
        needed). Unsharded layouts return the model itself."""
        return model if keep else None

    def save(self, output_dir, step: int, model, tokenizer, scheduler, state: dict, extra_models: dict | None) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            checkpoint.save(output_dir, step, model, tokenizer, self.optimizer, scheduler, state, self.cfg.save_total_limit,
                            extra_models)
        self.accelerator.wait_for_everyone()

    def load(self, ckpt: Path, model, scheduler, extra_models: dict | None) -> dict:
        checkpoint.load_weights(model, ckpt)
        for name, extra in (extra_models or {}).items():
            checkpoint.load_weights(extra, ckpt / name)
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        return checkpoint.load_state(ckpt, scheduler)


class FSDP(DDP):
    """FSDP2: every process holds a shard of each parameter, gradient and optimizer state."""

    sharded = True

    def prepare(self, module, make_optimizer):
        self.module = shard(module, self.accelerator.device, self.cfg.fsdp_reshard_after_forward,
                            self.cfg.fsdp_cpu_offload)
        self.optimizer = make_optimizer(self.module)  # over the shards
        return self.module, self.optimizer

    def accumulating(self, last):
        return contextlib.nullcontext()  # gradients are reduce-scattered after every micro-batch

    def clip(self, params):
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)  # over every shard of every process
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def whole(self, model, into=None, keep=True):
        from torch.distributed.tensor import DTensor

        if into is None and keep:
            into = new_like(model)
        # each tensor all-gathered in turn: the peak is the copy plus one tensor
        return copy_into(into, ((n, t.full_tensor() if isinstance(t, DTensor) else t)
                                for n, t in model.state_dict().items()))

    def whole_state(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """``(name, whole CPU tensor)`` for every entry of the model's state (every process calls this)."""
        from torch.distributed.tensor import DTensor

        return [(n, (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu"))
                for n, t in model.state_dict().items()]

    def save(self, output_dir, step, model, tokenizer, scheduler, state, extra_models):
        def write(tmp: Path) -> None:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optim_state = get_state_dict(self.module, self.optimizer)
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / SHARDED_DIR))

        prefix = next(name for name, m in self.module.named_modules() if m is model)
        checkpoint.save_sharded(output_dir, step, write, model, tokenizer, scheduler, {**state, "model_prefix": f"{prefix}."},
                                self.cfg.save_total_limit, self.accelerator.is_main_process)

    def load(self, ckpt, model, scheduler, extra_models):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(ckpt / SHARDED_DIR))  # resharded for this number of processes
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return checkpoint.load_state(ckpt, scheduler)


class DeepSpeed(DDP):
    """DeepSpeed ZeRO-2/3 around the loop's AdamW (see the module docstring)."""

    def __init__(self, cfg, accelerator):
        super().__init__(cfg, accelerator)
        self.sharded = cfg.deepspeed_zero_stage == 3

    def prepare(self, module, make_optimizer):
        import deepspeed

        if not dist.is_initialized():  # alone: a group of one (else DeepSpeed looks for MPI)
            os.environ.setdefault("LOCAL_RANK", "0")
            ensure_process_group(self.accelerator.device)
        self.optimizer = make_optimizer(module)  # the scheduler drives its learning rate; DeepSpeed steps it
        cfg = self.cfg
        config = {"train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
                  "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                  "zero_optimization": {"stage": cfg.deepspeed_zero_stage}, "zero_allow_untested_optimizer": True,
                  "gradient_clipping": cfg.max_grad_norm, "steps_per_print": 2**62,
                  "bf16": {"enabled": cfg.dtype == "bfloat16"}, "fp16": {"enabled": cfg.dtype == "float16"}}
        self.engine, self.zero, _, _ = deepspeed.initialize(model=module, optimizer=self.optimizer, config=config)
        self.module = self.engine
        # DeepSpeed averages over processes and divides by the accumulation steps: undo both
        self.backward = self.engine.backward
        self.loss_scale = self.accelerator.num_processes * cfg.gradient_accumulation_steps
        return self.engine, self.optimizer

    def accumulating(self, last):
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def step(self, params):
        self.engine.step()  # at the accumulation boundary: clip, AdamW on the partitions, zero the gradients
        self.memory = self.memory or self.state_bytes()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None or self.cfg.max_grad_norm <= 0 else float(norm)

    def state_bytes(self):
        zero = self.zero
        masters = getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(zero, "single_partition_of_fp32_groups")
        params = {id(p): p for p in self.engine.module.parameters()}.values()
        return {"params_bytes": sum(size_of(getattr(p, "ds_tensor", p)) for p in params),
                "grads_bytes": sum(size_of(m) for m in masters),  # gradients accumulate in fp32 partitions
                "optimizer_bytes": sum(size_of(m) for m in masters)  # the fp32 master partition + AdamW's two states
                + sum(size_of(v) for s in self.optimizer.state.values() for v in s.values())}

    def gathered(self, model):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=self.sharded)

    def whole(self, model, into=None, keep=True):
        if not self.sharded:
            return model if keep else None
        if into is None and keep:
            into = new_like(model)
        with self.gathered(model):
            return copy_into(into, model.state_dict().items() if keep else ())

    def whole_state(self, model):
        with self.gathered(model):
            return [(n, t.detach().to("cpu", copy=True)) for n, t in model.state_dict().items()]

    def save(self, output_dir, step, model, tokenizer, scheduler, state, extra_models):
        def write(tmp: Path) -> None:
            self.engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag="state", save_latest=False)

        checkpoint.save_sharded(output_dir, step, write, model, tokenizer, scheduler, state, self.cfg.save_total_limit,
                                self.accelerator.is_main_process)

    def load(self, ckpt, model, scheduler, extra_models):
        wrote = checkpoint.read_state(ckpt).get("processes")
        if wrote != self.accelerator.num_processes:
            raise UserError(f"{ckpt}: a DeepSpeed checkpoint of {wrote} process(es) resumes on {wrote}, not "
                            f"{self.accelerator.num_processes} (parallel: fsdp checkpoints resume on any number)")
        self.engine.load_checkpoint(str(ckpt / DEEPSPEED_DIR), tag="state", load_lr_scheduler_states=False)
        return checkpoint.load_state(ckpt, scheduler)


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
