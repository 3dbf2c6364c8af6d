"""Rollouts generated ahead of training (``async_steps: k``): a second engine samples the completions
of step ``s + k`` while the trainer trains step ``s``.

At the start of step ``s`` the trainer holds the weights after ``s`` updates (version ``s``). It
submits the job of step ``s + k`` with a snapshot of those weights (at step 0: the jobs of steps
``0..k``, all from version 0), then waits for the job of step ``s``, generated from version
``max(s − k, 0)``: the staleness never exceeds ``k``. The worker runs its jobs in order, one at a
time, each with the weights it was submitted with:

- ``ProcessWorker``: a second local process with the transformers engine on its own copy of the
  policy; a job carries its weights snapshot (moved to shared memory by ``torch.multiprocessing``).
- ``ServerWorker``: a thread that pushes the job's snapshot to the vLLM servers
  (``posttrain serve --engine vllm``) and generates there.

The completions carry the worker's log-probs (the stale sampling policy); the trainer recomputes the
old log-probs with its current weights and, with ``vllm_importance_sampling_cap``, weights each token
by the truncated ratio of the two (posttrain.train.rl.grpo), as for vLLM's rollouts.

Logged per step: ``staleness`` (``s`` minus the version generated from), ``generate_seconds`` (the
worker's time for the job) and ``async_wait_seconds`` (the trainer's time blocked on it). Generation
hidden behind training is ``1 − Σ wait / Σ generate``.

With an environment (``env``) a job is episodes (posttrain.envs.rollout): the worker builds its own
environment from ``Episodes`` (a local process cannot share the trainer's sandboxes) and plays the
job's records with the job's weights; the episodes come back with their model-token masks.

Resume: at a checkpoint after step ``s`` the jobs of steps ``s..s+k−1`` are waited for and their
completions stored with the checkpoint (``state``); a resumed run trains on exactly those.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from dataclasses import asdict
from typing import NamedTuple

import torch

from posttrain.envs.rollout import Episode, run_episodes
from posttrain.inference.engine import Completion


class Episodes(NamedTuple):
    """What a worker needs to play episodes instead of sampling completions."""

    env: str
    env_args: dict
    max_turns: int
    max_episode_tokens: int

    def make(self):
        from posttrain.envs import make_env

        return make_env(self.env, **self.env_args)


def sample(engine, env, episodes: Episodes | None, prompts: list, sampling, tokenizer) -> list[Completion]:
    """A job's rollouts: completions of token-id prompts, or with an environment, episodes of records."""
    if env is None:
        return engine.generate(prompts, sampling)
    return run_episodes(engine, env, prompts, sampling, episodes.max_turns, episodes.max_episode_tokens,
                        tokenizer=tokenizer)


def _die_with(trainer: int) -> None:
    """SIGKILL this process when the trainer that started it dies (Linux ``PR_SET_PDEATHSIG``): a kill
    -9 of the trainer leaves no worker holding its memory, its model and the trainer's pipes."""
    import ctypes
    import os
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the worker ends when it reads the trainer's None
        return
    if os.getppid() != trainer:  # the trainer died before the call
        os._exit(1)


def _serve_process(trainer: int, model_path: str, dtype: str, tokenizer, batch_size: int, threads: int,
                   episodes: Episodes | None, jobs, results) -> None:
    """The worker process: load the policy once, then per job load its weights and generate."""
    _die_with(trainer)
    torch.set_num_threads(threads)
    try:
        from posttrain.inference.open import rollout_engine
        from posttrain.models import load_model

        model = load_model(model_path, dtype).eval()
        engine = rollout_engine("transformers", tokenizer, policy=model, batch_size=batch_size)
        env = episodes.make() if episodes else None
    except Exception:  # noqa: BLE001 - reported to the trainer, which raises it
        results.put(("error", traceback.format_exc()))
        return
    while (job := jobs.get()) is not None:
        step, weights, prompts, sampling = job
        try:
            model.load_state_dict(weights)
            t = time.time()
            completions = sample(engine, env, episodes, prompts, sampling, tokenizer)
            results.put((step, completions, time.time() - t))
        except Exception:  # noqa: BLE001
            results.put(("error", traceback.format_exc()))
            return


class ProcessWorker:
    """Jobs run by a second local process with the transformers engine (``threads`` torch threads)."""

    def __init__(self, model_path: str, dtype: str, tokenizer, batch_size: int, threads: int = 1,
                 episodes: Episodes | None = None):
        ctx = torch.multiprocessing.get_context("spawn")
        self.jobs, self.results = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=_serve_process, daemon=True,
                                   args=(os.getpid(), model_path, dtype, tokenizer, batch_size, threads, episodes,
                                         self.jobs, self.results))
        self.process.start()

    def submit(self, step: int, weights: dict, prompts: list, sampling) -> None:
        self.jobs.put((step, weights, prompts, sampling))

    def next_result(self) -> tuple[int, list[Completion], float]:
        while True:
            try:
                got = self.results.get(timeout=5)
                break
            except queue.Empty:
                if not self.process.is_alive():
                    raise RuntimeError(f"async_steps: the rollout worker process died (exit code "
                                       f"{self.process.exitcode})") from None
        if got[0] == "error":
            raise RuntimeError(f"async_steps: the rollout worker failed:\n{got[1]}")
        return got

    def close(self) -> None:
        if self.process.is_alive():
            self.jobs.put(None)
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


class ServerWorker:
    """Jobs run by a thread against vLLM servers: push the job's weights (as version ``step``), generate."""

    def __init__(self, engine, tokenizer=None, episodes: Episodes | None = None):
        self.engine, self.jobs, self.results = engine, queue.Queue(), queue.Queue()
        self.tokenizer, self.episodes = tokenizer, episodes
        self.env = episodes.make() if episodes else None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            step, weights, prompts, sampling = job
            try:
                t = time.time()
                self.engine.load_weights(list(weights.items()), version=step)
                self.results.put((step, sample(self.engine, self.env, self.episodes, prompts, sampling, self.tokenizer),
                                  time.time() - t))
            except Exception as e:  # noqa: BLE001
                self.results.put(("error", e))
                return

    def submit(self, step: int, weights: dict, prompts: list, sampling) -> None:
        self.jobs.put((step, weights, prompts, sampling))

    def next_result(self) -> tuple[int, list[Completion], float]:
        got = self.results.get()
        if got[0] == "error":
            raise got[1]
        return got

    def close(self) -> None:
        self.jobs.put(None)


class AheadRollouts:
    """The jobs in flight and the finished ones, keyed by step; ``k`` = ``async_steps``."""

    def __init__(self, worker, k: int):
        self.worker, self.k = worker, k
        self.submitted: dict[int, int] = {}  # step -> weights version
        self.done: dict[int, tuple[list[Completion], float]] = {}

    def submit(self, step: int, version: int, weights: dict, prompts: list, sampling) -> None:
        self.worker.submit(step, weights, prompts, sampling)
        self.submitted[step] = version

    def result(self, step: int) -> tuple[list[Completion], dict]:
        """The completions of ``step`` (waiting for them) and the timeline entries to log."""
        t = time.time()
        self._collect([step])
        waited = time.time() - t
        completions, seconds = self.done.pop(step)
        version = self.submitted.pop(step)
        return completions, {"staleness": step - version, "generate_seconds": round(seconds, 3),
                             "async_wait_seconds": round(waited, 3)}

    def state(self, steps: range) -> dict:
        """The finished completions of ``steps`` (waited for), for a checkpoint."""
        self._collect([s for s in steps if s in self.submitted])
        return {str(s): {"version": self.submitted[s], "seconds": self.done[s][1],
                         "completions": [asdict(c) for c in self.done[s][0]]} for s in steps if s in self.submitted}

    def _collect(self, steps: list[int]) -> None:
        """Take the worker's results (in submission order) until every one of ``steps`` is done."""
        while any(s not in self.done for s in steps):
            got_step, completions, seconds = self.worker.next_result()
            self.done[got_step] = (completions, seconds)

    def load_state(self, state: dict) -> None:
        for s, entry in state.items():
            self.submitted[int(s)] = entry["version"]
            self.done[int(s)] = ([(Episode if "model_mask" in c else Completion)(**c) for c in entry["completions"]],
                                 entry["seconds"])

    def close(self) -> None:
        self.worker.close()
