"""The first losses of every stage on tiny models, pinned (as torchtune's recipe tests pin theirs): a
change to a loss, the loop, tokenization, packing, the data order or the sampler that moves a number
shows here, even when every behavioural test still passes.

Each stage runs 3 steps in fp32 with seed 0 on the CPU. The tolerance is relative 1e-4, and 2e-6
absolute for values near 0 (metrics are logged rounded to 6 decimals: two rounding units): the same
machine reproduces every value bit for bit (tests/test_resume.py, test_rlvr.py), and another x86 CPU's
kernels round a 2-layer model's sums differently by ~1e-6 relative per step, well inside it. A change
that means to move these numbers updates them here, and says why in its commit."""

import json

import pytest
from conftest import addition_records, mod2_task_files, write_jsonl

from posttrain.config import DPOConfig, MidtrainConfig, RewardConfig, RLVRConfig, SFTConfig
from posttrain.config_io import load_config
from posttrain.data.synth import arithmetic as ar
from posttrain.stages import STAGES

PINNED = {  # stage: {logged key: values at steps 1, 2, 3}, measured 2026-12-02 (twice, the same)
    "midtrain": {"loss": [5.713691, 5.706864, 5.373033]},
    "sft": {"loss": [5.782918, 5.264874, 4.978364]},
    "dpo": {"loss": [0.693147, 0.693224, 0.688269], "rewards/margins": [0.0, 6.1e-05, 0.010172]},
    "reward": {"loss": [0.69297, 0.693369, 0.690242], "rewards/accuracies": [0.75, 0.5, 0.625]},
    "rlvr": {"loss": [0.005438, -0.01441, -0.001289], "reward": [0.25, 0.3125, 0.40625]},
}
COMMON = {"max_steps": 3, "save_steps": 0, "logging_steps": 1, "seed": 0, "decontaminate_against": []}


@pytest.fixture(scope="module")
def mod2(tmp_path_factory):
    return mod2_task_files(tmp_path_factory.mktemp("pinned-mod2"))


def configs(tmp_path, tiny_model_dir, parity_task, mod2) -> dict:
    corpus = tmp_path / "add.txt"
    corpus.write_text("\n".join(ar.corpus_line("add", a, b) for a, b in ar.problems("add", 200, 2, 0)) + "\n")
    chat = write_jsonl(tmp_path / "sft.jsonl", addition_records(40))
    out = lambda name: str(tmp_path / name)  # noqa: E731
    return {
        "midtrain": (MidtrainConfig, {"model": str(tiny_model_dir), "datasets": [{"path": str(corpus)}],
                                      "max_seq_length": 64, "per_device_train_batch_size": 8, "learning_rate": 3e-3,
                                      "output_dir": out("midtrain")}),
        "sft": (SFTConfig, {"model": str(tiny_model_dir), "datasets": [{"path": str(chat)}], "chat_template": "tulu",
                            "max_seq_length": 64, "packing": True, "per_device_train_batch_size": 4,
                            "learning_rate": 3e-3, "output_dir": out("sft")}),
        "dpo": (DPOConfig, {"model": str(parity_task["sft"]), "datasets": [{"path": str(parity_task["train"])}],
                            "max_seq_length": 64, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                            "beta": 0.1, "output_dir": out("dpo")}),
        "reward": (RewardConfig, {"model": str(parity_task["sft"]), "datasets": [{"path": str(parity_task["train"])}],
                                  "max_seq_length": 64, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                                  "output_dir": out("reward")}),
        "rlvr": (RLVRConfig, {"model": mod2["sft"], "datasets": [{"path": str(mod2["train"])}],
                              "max_completion_length": 4, "num_generations": 8, "per_device_train_batch_size": 32,
                              "learning_rate": 1e-3, "temperature": 1.0, "output_dir": out("rlvr")}),
    }


def first_values(stage: str, cls, base: dict, keys) -> dict[str, list[float]]:
    result = STAGES[stage].run(load_config(cls, base={**base, **COMMON}))
    rows = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    return {key: [r[key] for r in rows if key in r][:3] for key in keys}


def test_the_first_losses_of_every_stage_are_pinned(tmp_path, tiny_model_dir, parity_task, mod2):
    assert set(PINNED) == {name for name, s in STAGES.items() if s.trains}
    got = {stage: first_values(stage, cls, base, PINNED[stage])
           for stage, (cls, base) in configs(tmp_path, tiny_model_dir, parity_task, mod2).items()}
    for stage, want in PINNED.items():
        for key, values in want.items():
            assert got[stage][key] == pytest.approx(values, rel=1e-4, abs=2e-6), (stage, key, got[stage][key])
