"""``parallel: fsdp`` (FSDP2) and ``parallel: deepspeed`` (ZeRO-2/3) with 2 CPU processes (gloo) against
one unsharded process with the same global batch: the same loss curve and final weights for SFT, DPO,
GRPO and PPO, with every FSDP option; the parameter, gradient and optimizer bytes each process holds;
sharded checkpoints that survive kill -9 and (FSDP) resume on one process; whole recipes under torchrun.

Tolerances: the two layouts sum the same terms in another order (per-process partial sums, then a
reduce-scatter), so float32 results differ by rounding: about ``sqrt(n) * 6e-8`` relative for sums of
``n`` ~ 1e3 terms, a few 1e-6 after a few Adam steps of lr 1e-3 on weights of order 0.1; 1e-4 bounds it
with room. Adam divides each coordinate's update by the root of its own squared gradient, so where a
gradient is itself of the order of the rounding (embedding rows of tokens a step barely uses) the
noise can move a weight by up to the learning rate: the DPO case (beta 5, the sharpest loss) trains
at 1e-4 for that reason; the other stages pass at 1e-3."""

import json
import os
import subprocess
import sys

import pytest
from conftest import mod2_task_files, multi_turn_records, write_jsonl
from safetensors.torch import load_file

from posttrain.config import SFTConfig
from posttrain.config_io import load_config
from posttrain.errors import UserError
from posttrain.train import checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "posttrain.cli"]
ONE = [sys.executable, "-m", "posttrain.cli"]
KILL_AFTER = os.path.join(os.path.dirname(__file__), "kill_after.py")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, parity_task) -> dict:
    root = tmp_path_factory.mktemp("fsdp")
    return {"mod2": mod2_task_files(root / "mod2"), "parity": parity_task,
            "chat": write_jsonl(root / "chat.jsonl", multi_turn_records(48))}


def stage_config(tasks, stage: str, tmp_path, tiny_model_dir) -> str:
    """One config per stage with a global batch of 2 processes x 2 x 2 (the single process doubles the
    per-device batch on the command line)."""
    body = {
        "sft": f"model: {tiny_model_dir}\ndatasets:\n  - path: {tasks['chat']}\nmax_seq_length: 96\npacking: true\n"
               "learning_rate: 1.0e-3\nmax_steps: 6\n",
        "dpo": f"model: {tasks['parity']['sft']}\ndatasets:\n  - path: {tasks['parity']['train']}\nmax_seq_length: 64\n"
               "loss_type: dpo_norm\nbeta: 5\nlearning_rate: 1.0e-4\nmax_steps: 6\n",
        "rlvr": f"model: {tasks['mod2']['sft']}\ndatasets:\n  - path: {tasks['mod2']['train']}\nmax_completion_length: 4\n"
                "num_generations: 8\nlearning_rate: 1.0e-3\nmax_steps: 3\nbeta: 0.05\nnum_iterations: 2\n",
    }[stage]
    path = tmp_path / f"{stage}.yaml"
    path.write_text(body + "chat_template: tulu\ngradient_accumulation_steps: 2\nsave_steps: 2\nlogging_steps: 1\n")
    return str(path)


def curve(run_dir, key="loss") -> list[float]:
    return [json.loads(x)[key] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def max_weight_diff(a, b, name="model.safetensors") -> float:
    wa, wb = load_file(str(a / name)), load_file(str(b / name))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


FSDP = ["parallel=fsdp"]
ZERO2, ZERO3 = ["parallel=deepspeed", "deepspeed_zero_stage=2"], ["parallel=deepspeed", "deepspeed_zero_stage=3"]
# what a process holds against one unsharded process (params, gradients, optimizer state): FSDP halves all
# three; DeepSpeed halves the gradients (fp32 partitions), ZeRO-3 the parameters too, and its optimizer
# state is AdamW's two states on the partition (half of 8 bytes per parameter) plus the fp32 master
# partition (half of 4): 6 / 8 = 0.75 of an unsharded AdamW
HALF, ZERO2_SHARE, ZERO3_SHARE = (0.5, 0.5, 0.5), (1.0, 0.5, 0.75), (0.5, 0.5, 0.75)


# SFT with every FSDP option (DPO, GRPO and PPO with the defaults); `pytest -m slow` adds DPO under ZeRO-3
@pytest.mark.parametrize("stage,per_device,extra,share", [
    ("sft", 2, FSDP + ["fsdp_reshard_after_forward=false", "fsdp_cpu_offload=true", "gradient_checkpointing=true"], HALF),
    ("dpo", 2, FSDP, HALF),
    ("rlvr", 16, FSDP + ["algorithm=grpo"], HALF),
    ("rlvr", 16, FSDP + ["algorithm=ppo"], HALF),
    ("sft", 2, ZERO2 + ["gradient_checkpointing=true"], ZERO2_SHARE),
    pytest.param("dpo", 2, ZERO3, ZERO3_SHARE, marks=pytest.mark.slow),
    ("rlvr", 16, ZERO3 + ["algorithm=grpo"], ZERO3_SHARE),
], ids=["sft", "dpo", "grpo", "ppo", "sft-zero2", "dpo-zero3", "grpo-zero3"])
def test_sharded_on_two_processes_trains_as_one(tasks, stage, per_device, extra, share, tmp_path, tiny_model_dir):
    cfg = stage_config(tasks, stage, tmp_path, tiny_model_dir)
    one, two = tmp_path / "one", tmp_path / "two"
    got = subprocess.run(ONE + [stage, "--config", cfg, f"output_dir={one}", f"per_device_train_batch_size={2 * per_device}",
                                *[e for e in extra if e.startswith("algorithm")]],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    got = subprocess.run(TORCHRUN + [stage, "--config", cfg, f"output_dir={two}", f"per_device_train_batch_size={per_device}",
                                     *extra], env=ENV, capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    assert "2 process(es)" in got.stderr
    a, b = curve(one), curve(two)
    assert len(a) == len(b) and all(abs(x - y) <= 1e-4 for x, y in zip(a, b)), (a, b)
    # the first step starts from the same weights: its gradient norm (a wrong scale would show here; Adam's
    # updates would hide it) agrees to summation rounding and the 6 decimals of the log
    norms = curve(one, "grad_norm")[0], curve(two, "grad_norm")[0]
    assert abs(norms[0] - norms[1]) <= 1e-5 * norms[0] + 1e-6, norms
    assert max_weight_diff(one, two) <= 1e-4
    if stage == "rlvr":  # per-prompt sampling streams: both layouts draw the same completions
        assert curve(one, "reward") == curve(two, "reward")
    if "algorithm=ppo" in extra:
        assert max_weight_diff(one, two, "value/model.safetensors") <= 1e-4
    ckpt = checkpoint.latest(two)
    if "parallel=fsdp" in extra:  # every process's DCP shards, which evaluation reads back as a model
        assert (ckpt / "sharded" / ".metadata").is_file() and len(list((ckpt / "sharded").glob("*.distcp"))) == 2
        if stage == "sft":
            from posttrain.models import load_model

            got = load_model(str(ckpt)).state_dict()
            want = load_file(str(one / "checkpoints" / ckpt.name / "model.safetensors"))
            assert max(float((got[k] - want[k]).abs().max()) for k in want) <= 1e-4
    else:  # every process's ZeRO partitions
        assert len(list((ckpt / "deepspeed" / "state").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    assert not (ckpt / "optimizer.pt").exists() and not (ckpt / "model.safetensors").exists()
    # what each process holds against one process (a DDP process holds what one process does: test_distributed);
    # the tiny models' sizes divide by 2, so the shares are exact up to DeepSpeed's partition padding
    full = json.loads((one / "manifest.json").read_text())["metrics"]
    part = json.loads((two / "manifest.json").read_text())["metrics"]
    for key, want in zip(("params_bytes", "grads_bytes", "optimizer_bytes"), share):
        assert abs(part[key] / full[key] - want) <= 0.01, (key, part[key], full[key], want)


@pytest.mark.parametrize("parallel", ["fsdp", "deepspeed"])
def test_sharded_checkpoints_survive_kill_9_and_resume(parallel, tasks, tmp_path, tiny_model_dir):
    """2 processes killed with SIGKILL after a checkpoint: restarted on 2, the final weights equal an
    uninterrupted run's bit for bit. Restarted on 1 (twice the per-device batch: the same global batch):
    FSDP's DCP shards reshard, and the weights equal it up to the summation-order rounding of the module
    docstring; DeepSpeed's partitions are refused with a one-line error."""
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\nchat_template: tulu\ndatasets:\n  - path: {tasks['chat']}\n"
                   "max_seq_length: 96\npacking: true\nlearning_rate: 1.0e-3\nlr_scheduler_type: cosine\n"
                   f"warmup_ratio: 0.1\nmax_steps: 40\nsave_steps: 10\nsave_total_limit: 2\nparallel: {parallel}\n"
                   "per_device_train_batch_size: 2\ngradient_accumulation_steps: 2\nseed: 5\n")
    sft = lambda out, *over, n=2: (TORCHRUN if n == 2 else ONE) + ["sft", "--config", str(cfg), f"output_dir={out}", *over]  # noqa: E731
    ref = tmp_path / "ref"
    subprocess.run(sft(ref), check=True, env=ENV, capture_output=True, timeout=600)

    for name, resume in (("again-on-2", []), ("on-1", ["per_device_train_batch_size=4"])):
        run_dir = tmp_path / name
        # both processes SIGKILLed right after checkpoint 20 is in place (tests/kill_after.py)
        killed = subprocess.run(TORCHRUN[:-2] + [KILL_AFTER, "20", "sft", "--config", str(cfg), f"output_dir={run_dir}"],
                                env=ENV, capture_output=True, timeout=600)
        assert killed.returncode != 0 and not (run_dir / "manifest.json").exists()
        killed_at = int(checkpoint.latest(run_dir).name.split("-")[1])
        assert killed_at == 20
        got = subprocess.run(sft(run_dir, *resume, n=1 if resume else 2), env=ENV, capture_output=True, text=True,
                             timeout=600)
        if resume and parallel == "deepspeed":
            assert got.returncode == 2
            assert got.stderr.strip().splitlines()[-1].endswith(
                "a DeepSpeed checkpoint of 2 process(es) resumes on 2, not 1 (parallel: fsdp checkpoints resume on any number)")
            continue
        assert got.returncode == 0, got.stderr[-3000:]
        assert f"resuming from {run_dir / 'checkpoints' / f'checkpoint-{killed_at}'}" in got.stderr
        assert len(curve(run_dir)) == 40
        if resume:
            assert max_weight_diff(ref, run_dir) <= 1e-4
            assert json.loads((run_dir / "manifest.json").read_text())["world_size"] == 1
        else:
            assert max_weight_diff(ref, run_dir) == 0.0
            assert curve(ref) == curve(run_dir)
    if parallel == "deepspeed":
        return

    # the same checkpoint, read with the wrong layout or global batch: one line that says what to change
    run_dir = tmp_path / "again-on-2"
    (run_dir / "manifest.json").unlink()
    with pytest.raises(UserError, match="written with parallel: fsdp; resume it with the same setting"):
        from posttrain.train.sft import run_sft
        run_sft(load_config(SFTConfig, str(cfg), [f"output_dir={run_dir}", "per_device_train_batch_size=4",
                                                  "parallel=ddp"]))
    with pytest.raises(UserError, match="its global batch is 8, this run's 4: set per_device_train_batch_size"):
        run_sft(load_config(SFTConfig, str(cfg), [f"output_dir={run_dir}"]))


def test_a_recipe_runs_under_torchrun(tmp_path, tiny_model_dir, tasks):
    """``torchrun -m posttrain.cli run``: the SFT stage trains sharded on both processes, the evaluation
    runs once on process 0, one report; the result equals a single-process run of the same recipe."""
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}
                                                   for i in range(4)])

    def recipe(name, per_device):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"""output_dir: {tmp_path / name}
stages:
  - name: sft
    stage: sft
    config: {{model: {tiny_model_dir}, chat_template: tulu, datasets: [{{path: {tasks['chat']}}}], max_seq_length: 96,
              packing: true, per_device_train_batch_size: {per_device}, learning_rate: 1.0e-3, max_steps: 4,
              parallel: fsdp}}
  - name: eval-sft
    stage: eval
    config: {{tasks: [gsm8k], data: {{gsm8k: {questions}}}, limit: 4}}
""")
        return str(path)

    got = subprocess.run(TORCHRUN + ["run", recipe("two", 2)], env=ENV, capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stderr.count("run: stage eval-sft (eval) done") == 1
    subprocess.run(ONE + ["run", recipe("one", 4)], check=True, env=ENV, capture_output=True, timeout=600)
    stages = json.loads((tmp_path / "two" / "stages.json").read_text())
    assert [s["stage"] for s in stages] == ["sft", "eval-sft"]
    assert stages[1]["results"]["gsm8k"]["instances"] == 4
    assert (tmp_path / "two" / "report.html").is_file()
    assert json.loads((tmp_path / "two" / "sft" / "manifest.json").read_text())["world_size"] == 2
    assert max_weight_diff(tmp_path / "one" / "sft", tmp_path / "two" / "sft") <= 1e-4
    # run again under torchrun: every stage is skipped (same global batch, so the same chain)
    again = subprocess.run(TORCHRUN + ["run", recipe("two", 2)], env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stderr.count("skipped, already done") == 2, again.stderr[-3000:]


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_an_accelerate_config_that_shards_is_refused(kind, tmp_path):
    """accelerate launch with an accelerate config that shards (accelerate applies it on GPUs only, so the
    accelerator is stood in for here): one line pointing at the posttrain key."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from posttrain.train import parallel

    cfg = load_config(SFTConfig, base={"model": "m", "output_dir": str(tmp_path), "datasets": [{"path": "d.jsonl"}]})
    with pytest.raises(UserError, match=f"^accelerate config: distributed_type {kind} is not used by posttrain; launch "
                                        "with a plain multi-process config and set parallel in the posttrain config"):
        parallel.layout(cfg, SimpleNamespace(distributed_type=DistributedType[kind]))
    plain = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, backward=None, num_processes=2)
    assert isinstance(parallel.layout(cfg, plain), parallel.DDP)


def test_fsdp_settings_are_checked(tmp_path):
    base = {"model": "m", "output_dir": str(tmp_path), "datasets": [{"path": "d.jsonl"}]}
    with pytest.raises(UserError, match="'fsdp_cpu_offload' needs parallel: fsdp"):
        load_config(SFTConfig, base={**base, "fsdp_cpu_offload": True})
    with pytest.raises(UserError, match="use_peft with parallel: fsdp is not supported"):
        load_config(SFTConfig, base={**base, "parallel": "fsdp", "use_peft": True})
    with pytest.raises(UserError, match="expected one of ddp, fsdp"):
        load_config(SFTConfig, base={**base, "parallel": "zero3"})


def test_a_finished_command_destroys_its_process_group(tasks, tmp_path, tiny_model_dir):
    """FSDP in one process makes a group of one; the command destroys it when it ends, since gloo threads
    left to the interpreter's teardown now and then abort a finished run (exit -6, seen under torchrun)."""
    import torch.distributed as dist

    from posttrain.cli import main

    cfg = stage_config(tasks, "sft", tmp_path, tiny_model_dir)
    assert main(["sft", "--config", cfg, f"output_dir={tmp_path / 'run'}", "max_steps=1", "save_steps=0",
                 "parallel=fsdp"]) == 0
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert not dist.is_initialized()
