"""One way to name an engine on the command line, and a disk cache that makes long data jobs resumable.

``open_engine(spec)``: ``openai:<model>@<base_url>`` is an OpenAI-compatible endpoint (vLLM,
``posttrain serve``, a hosted API; key from ``OPENAI_API_KEY``), ``vllm:<model>`` a local model run
by vLLM in this process, anything else a local model (a directory, a hub id or an alias) run by the
transformers engine. With ``cache_dir`` every answer is
kept on disk as soon as it exists, so an interrupted command, run again, sends nothing twice:

- the endpoint engine caches each request itself (``OpenAIEngine``);
- a local engine is wrapped in ``CachedEngine``: prompts are generated in fixed chunks of the full
  prompt list, chunk ``i`` with seed ``sampling.seed + i``, and each finished chunk is stored under a
  hash of (model fingerprint, its prompts, the sampling parameters, ``i``). A re-run loads finished
  chunks and regenerates the rest with the same seeds, so its results equal an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

from posttrain.atomic import write_json
from posttrain.errors import UserError
from posttrain.inference.engine import Completion, SamplingParams, progress_bar
from posttrain.util import model_fingerprint


class CachedEngine:
    def __init__(self, engine, cache_dir: str | Path, model_key: str, chunk: int = 64):
        self.engine, self.cache_dir, self.model_key, self.chunk = engine, Path(cache_dir), model_key, chunk
        self.stats = {"chunks_generated": 0, "chunks_cached": 0}
        self.progress: str | None = None  # a label: a progress bar over the chunks (cached ones count at once)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def stop_ids(self):
        return self.engine.stop_ids

    def encode(self, prompt) -> list[int]:
        return self.engine.encode(prompt)

    def generate(self, prompts: list, sampling: SamplingParams | None = None) -> list[Completion]:
        sampling = sampling or SamplingParams()
        out: list[Completion] = []
        bar = progress_bar(self.progress, len(prompts) * sampling.n)
        for i in range(0, len(prompts), self.chunk):
            part = prompts[i:i + self.chunk]
            key = hashlib.sha256(json.dumps([self.model_key, part, asdict(sampling), i // self.chunk],
                                            sort_keys=True, default=str).encode()).hexdigest()
            path = self.cache_dir / key[:2] / f"{key}.json"
            if path.is_file():
                got = [Completion(**c) for c in json.loads(path.read_text())]
                self.stats["chunks_cached"] += 1
            else:
                got = self.engine.generate(part, replace(sampling, seed=sampling.seed + i // self.chunk))
                write_json(path, [asdict(c) for c in got])
                self.stats["chunks_generated"] += 1
            out += [replace(c, prompt_index=c.prompt_index + i) for c in got]
            bar.update(len(got))
        bar.close()
        return out


ENGINES = ("transformers", "vllm")


def local_engine(path: str, engine: str = "transformers", batch_size: int = 16):
    """A local model in the named engine: ``transformers`` (default) or ``vllm`` (optional extra)."""
    if engine == "vllm":
        from posttrain.inference.vllm_engine import VLLMEngine

        return VLLMEngine(path, batch_size=batch_size)
    if engine != "transformers":
        raise UserError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    from posttrain.inference.engine import TransformersEngine

    return TransformersEngine.load(path, batch_size)


def rollout_engine(engine: str, tokenizer, *, policy=None, model: str | None = None, servers: list[str] = (),
                   dtype: str = "float32", seed: int = 0, batch_size: int = 16,
                   gpu_memory_utilization: float | None = None):
    """The engine a trainer samples from: ``transformers`` generates with ``policy`` itself (a model in
    memory, trained in place); ``vllm`` with ``servers`` draws from those ``posttrain serve --engine
    vllm`` processes (``VLLMServers``); ``vllm`` alone starts vLLM in this process on ``model`` (the
    trainer pushes its weights: ``load_weights``)."""
    if engine == "transformers":
        from posttrain.inference.engine import TransformersEngine

        return TransformersEngine(policy, tokenizer, batch_size=batch_size)
    if engine != "vllm":
        raise UserError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if servers:
        from posttrain.inference.vllm_servers import VLLMServers

        return VLLMServers(list(servers), tokenizer)
    from posttrain.inference.vllm_engine import VLLMEngine

    return VLLMEngine(model, dtype=dtype, seed=seed, batch_size=batch_size, gpu_memory_utilization=gpu_memory_utilization)


def open_engine(spec: str, cache_dir: str | Path | None = None, batch_size: int = 16, chunk: int = 64,
                max_retries: int = 6):
    """The engine a data command was given: an endpoint, ``vllm:<model>`` or a local model (see the
    module docstring)."""
    if spec.startswith("openai:"):
        from posttrain.inference.openai_engine import OpenAIEngine

        return OpenAIEngine.from_spec(spec, cache_dir=cache_dir, max_retries=max_retries)
    from posttrain.models import resolve

    kind, _, name = spec.partition(":") if spec.startswith("vllm:") else ("transformers", "", spec)
    path = resolve(name)
    engine = local_engine(path, kind, batch_size)
    return CachedEngine(engine, cache_dir, model_fingerprint(path), chunk) if cache_dir else engine
