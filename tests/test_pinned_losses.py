"""The first losses of every stage on tiny models, pinned (as torchtune's recipe tests pin theirs): a
change to a loss, the loop, tokenization, packing, the data order or the sampler that moves a number
shows here, even when every behavioural test still passes.

Each stage runs 3 steps in fp32 with seed 0 on the CPU. The tolerance is relative 1e-4: the same
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

PINNED = {  # stage: {logged key: values at steps 1, 2, 3}
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
    print(json.dumps(got))
    for stage, want in PINNED.items():
        for key, values in want.items():
            assert got[stage][key] == pytest.approx(values, rel=1e-4, abs=1e-7), (stage, key, got[stage][key])
