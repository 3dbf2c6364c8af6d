"""The configs of the training stages: dataclasses with their defaults and ``validate()``.

Names follow TRL/transformers (``learning_rate``, ``per_device_train_batch_size``, ...). They are
filled from YAML and ``key=value`` overrides by posttrain.config_io.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from posttrain.errors import UserError


@dataclass
class DataSource:
    """One entry of ``datasets:``. ``count`` takes that many records; ``fraction`` takes that share
    (above 1 it upsamples: 2.5 = every record twice plus a seeded half). Neither: all records."""

    path: str = ""
    split: str = "train"
    name: str | None = None  # a hub dataset's configuration name
    count: int | None = None
    fraction: float | None = None
    license: str | None = None
    format: Literal["auto", "messages", "prompt_completion", "gsm8k", "hh_rlhf", "preference", "math", "ifeval",
                    "humaneval", "self_instruct"] = "auto"

    def validate(self, where: str) -> None:
        if not self.path:
            raise UserError(f"{where}: field 'path' is required")
        if self.count is not None and self.fraction is not None:
            raise UserError(f"{where}: give 'count' or 'fraction', not both")
        if self.count is not None and self.count < 0:
            raise UserError(f"{where}: field 'count' must be >= 0, got {self.count}")
        if self.fraction is not None and self.fraction < 0:
            raise UserError(f"{where}: field 'fraction' must be >= 0, got {self.fraction}")


@dataclass
class TrainConfig:
    """Keys every training stage shares: model, data, optimisation, checkpoints and logging."""

    model: str = ""
    output_dir: str = ""
    datasets: list[DataSource] = field(default_factory=list)
    eval_datasets: list[DataSource] = field(default_factory=list)
    chat_template: str | None = None  # tulu | chatml | gemma | a Jinja string; None: the tokenizer's own
    max_seq_length: int = 1024
    # optimisation
    learning_rate: float = 2e-5
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    warmup_ratio: float = 0.0
    lr_scheduler_type: Literal["linear", "cosine", "cosine_min", "constant"] = "linear"
    min_lr_ratio: float = 0.1  # cosine_min: the learning rate ends at this share of the peak
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    # several processes (torchrun, accelerate launch): ddp gives each the whole model; fsdp shards
    # parameters, gradients and optimizer state (FSDP2, one unit per decoder layer; docs/distributed.md)
    parallel: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    fsdp_reshard_after_forward: bool = True  # free a layer's gathered weights after its forward
    fsdp_cpu_offload: bool = False  # shards, gradients and the optimizer step in CPU memory
    deepspeed_zero_stage: Literal[2, 3] = 3  # parallel: deepspeed; 2: gradients + optimizer state, 3: + parameters
    # LoRA through peft (TRL's names); the final checkpoint has the adapter merged in
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # keep the token embeddings (and a tied output head) fixed: with a large vocabulary (Gemma 3: 262k rows)
    # this skips the head's weight gradient and its AdamW state, a third of the head's cost
    freeze_embeddings: bool = False
    # checkpoints and logging
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 1
    eval_steps: int = 0
    per_device_eval_batch_size: int = 8
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    overwrite_output_dir: bool = False
    # the contamination report in manifest.json: evaluation sets as `posttrain data decontaminate --against`
    # takes them (suite:dev, gsm8k=PATH); None: the built-in suites where present here; []: off
    decontaminate_against: list[str] | None = None

    def validate(self) -> None:
        if not self.model:
            raise UserError("config: key 'model' is required (a hub id, a local directory, a .gguf file or an alias)")
        if not self.output_dir:
            raise UserError("config: key 'output_dir' is required")
        positive = ["max_seq_length", "per_device_train_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "per_device_eval_batch_size", "lora_r"]
        for key in positive:
            if getattr(self, key) <= 0:
                raise UserError(f"config: key '{key}' must be > 0, got {getattr(self, key)}")
        if self.learning_rate < 0:
            raise UserError(f"config: key 'learning_rate' must be >= 0, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise UserError(f"config: key 'warmup_ratio' must be in [0, 1], got {self.warmup_ratio}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise UserError("config: set 'max_steps' > 0 or 'num_train_epochs' > 0")
        if self.parallel != "fsdp" and self.fsdp_cpu_offload:
            raise UserError("config: key 'fsdp_cpu_offload' needs parallel: fsdp")
        if self.parallel != "ddp" and self.use_peft:
            raise UserError(f"config: use_peft with parallel: {self.parallel} is not supported (use parallel: ddp for LoRA)")
        if self.parallel != "ddp" and self.freeze_embeddings:
            raise UserError(f"config: freeze_embeddings with parallel: {self.parallel} is not supported (use parallel: ddp)")
        if self.parallel == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            raise UserError("config: parallel: deepspeed needs the deepspeed package (pip install deepspeed)")
        for i, src in enumerate(self.datasets):
            src.validate(f"config: datasets[{i}]")
        for i, src in enumerate(self.eval_datasets):
            src.validate(f"config: eval_datasets[{i}]")


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning (see posttrain.train.sft for the loss)."""

    packing: bool = False
    loss_reduction: Literal["mean", "sum"] = "mean"
    # tokens added to the vocabulary before training (new embedding rows start at the mean row);
    # "selfrag" stands for Self-RAG's reflection tokens (posttrain.rag.selfrag.TOKENS)
    add_tokens: list[str] = field(default_factory=list)
    # {TOKEN: FROM}: before training, TOKEN's embedding row is set to FROM's; a template token the base
    # model never learned to emit starts from one it does (gemma3-270m: {"<end_of_turn>": "<eos>"})
    init_embeddings_from: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        if not self.datasets:
            raise UserError("config: key 'datasets' is required: a list of {path: FILE_OR_HUB_ID, ...}")
        if self.add_tokens and self.freeze_embeddings:
            raise UserError("config: add_tokens needs trained embeddings (the new rows); drop freeze_embeddings")


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation and its relatives (see posttrain.train.dpo for the losses).
    Defaults follow TRL; Tulu 3's final recipe is ``loss_type: dpo_norm``, ``beta: 5``,
    ``learning_rate: 5e-7``, one epoch."""

    learning_rate: float = 5e-7
    beta: float = 0.1
    loss_type: Literal["dpo", "dpo_norm", "simpo", "ipo"] = "dpo"
    label_smoothing: float = 0.0
    gamma_beta_ratio: float = 0.5  # simpo: the margin gamma is gamma_beta_ratio * beta
    rpo_alpha: float = 0.0  # weight of the chosen responses' per-token NLL added to the loss (RPO)
    packing: bool = False  # several pairs per row (each row holds whole pairs, chosen then rejected)

    def validate(self) -> None:
        super().validate()
        if not self.datasets:
            raise UserError("config: key 'datasets' is required: a list of preference sources")
        if self.beta <= 0:
            raise UserError(f"config: key 'beta' must be > 0, got {self.beta}")
        if self.rpo_alpha < 0:
            raise UserError(f"config: key 'rpo_alpha' must be >= 0, got {self.rpo_alpha}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f"config: key 'label_smoothing' must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class RewardConfig(TrainConfig):
    """A Bradley-Terry reward model: a scalar head on the last token of a conversation."""

    learning_rate: float = 1e-5
    packing: bool = False

    def validate(self) -> None:
        super().validate()
        if not self.datasets:
            raise UserError("config: key 'datasets' is required: a list of preference sources")


@dataclass
class RLVRConfig(TrainConfig):
    """Reinforcement learning with verifiable rewards (see posttrain.train.rlvr). Names follow TRL's
    GRPOConfig/PPOConfig where they exist. A step samples ``num_generations`` completions for each of
    ``per_device_train_batch_size * gradient_accumulation_steps * processes / num_generations``
    prompts, scores them, and makes ``num_iterations`` optimizer updates on that batch."""

    algorithm: Literal["grpo", "ppo"] = "grpo"
    learning_rate: float = 1e-6
    # rollouts
    num_generations: int = 8
    max_prompt_length: int = 512
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    generation_batch_size: int = 64  # completions decoded together by the engine
    engine: Literal["transformers", "vllm"] = "transformers"  # vllm: weights pushed after every step
    vllm_servers: list = field(default_factory=list)  # URLs of posttrain serve --engine vllm; []: in this process
    vllm_gpu_memory_utilization: float | None = None  # colocated engine's share of the device (None: vLLM's 0.9)
    # None: the trainer's old log-probs only; C: also weight each token by min(pi_old / pi_vllm, C)
    # (pi_vllm: the sampling engine's log-probs, from vLLM or from async_steps' stale weights)
    vllm_importance_sampling_cap: float | None = None
    # rollouts for step t + async_steps are generated by a second engine while step t trains (0: in turn)
    async_steps: int = 0
    # drop groups whose rewards all agree and sample more prompts until the batch is full (DAPO)
    dynamic_sampling: bool = False
    dynamic_sampling_max_tries: int = 4  # rollout batches per step at most; then zero-variance groups fill it
    mask_truncated: bool = False  # completions cut by max_completion_length get no gradient
    # a prompt computed once for its completions in the update (see posttrain.train.rl.rows)
    share_prompt: Literal["auto", "always", "never"] = "auto"
    # multi-turn tool use (posttrain.envs): every rollout is an episode of this environment, in which
    # max_completion_length bounds each model turn
    env: str | None = None  # python or search; None: single-turn completions
    env_args: dict = field(default_factory=dict)  # the environment's options, e.g. {timeout: 5} or {index: DIR}
    max_turns: int = 4  # model turns per episode at most
    max_episode_tokens: int = 1024  # tokens after the prompt per episode, the environment's included
    # rewards: score = sum_v verifier_weights[v] * verifier_v  (+ format_reward_weight * format)
    #                  - unfinished_penalty (completions that hit max_completion_length)
    verifier_weights: dict = field(default_factory=dict)  # verifier name -> weight (default 1.0)
    format_reward: str | None = None  # e.g. think_format
    format_reward_weight: float = 0.5
    unfinished_penalty: float = 0.0
    overlong_buffer: int = 0  # DAPO's soft overlong penalty over the last overlong_buffer tokens (0: off)
    overlong_penalty: float = 1.0  # ... reaching this at max_completion_length
    reward_scale: float = 1.0  # multiplies the verifier score (Tulu 3 PPO: 10)
    # the objective
    beta: float = 0.0  # KL to the initial policy (0: no reference model kept)
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon (dapo: 0.28)
    num_iterations: int = 1  # optimizer updates per rollout batch (PPO epochs)
    # grpo
    advantage: Literal["group", "rloo", "reinforce_pp"] = "group"
    scale_rewards: Literal["group", "none"] = "group"
    loss_type: Literal["token_mean", "sequence_mean", "dr_grpo", "dapo", "gspo", "cispo"] = "token_mean"
    drop_zero_variance: bool = False
    # ppo
    value_model: str | None = None  # a reward model directory to start the value head from; None: the policy
    reward_model: str | None = None  # add this reward model's score to the verifier reward
    reward_model_weight: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    cliprange_value: float = 0.2
    whiten_advantages: bool = True

    def validate(self) -> None:
        super().validate()
        if not self.datasets:
            raise UserError("config: key 'datasets' is required: a list of verifiable-prompt sources")
        for key in ("num_generations", "max_prompt_length", "max_completion_length", "generation_batch_size",
                    "num_iterations"):
            if getattr(self, key) <= 0:
                raise UserError(f"config: key '{key}' must be > 0, got {getattr(self, key)}")
        if self.algorithm == "grpo" and self.num_generations < 2:
            raise UserError("config: grpo needs num_generations >= 2 (advantages are relative to the group)")
        if self.per_device_train_batch_size * self.gradient_accumulation_steps % self.num_generations:
            raise UserError(f"config: per_device_train_batch_size x gradient_accumulation_steps "
                            f"({self.per_device_train_batch_size * self.gradient_accumulation_steps}) must be a "
                            f"multiple of num_generations ({self.num_generations}): whole groups per process")
        if self.temperature <= 0:
            raise UserError(f"config: key 'temperature' must be > 0 for RL sampling, got {self.temperature}")
        if self.beta < 0 or self.epsilon <= 0:
            raise UserError("config: keys 'beta' must be >= 0 and 'epsilon' > 0")
        if self.engine != "vllm" and (self.vllm_servers or self.vllm_gpu_memory_utilization is not None):
            raise UserError("config: keys 'vllm_servers' and 'vllm_gpu_memory_utilization' need engine: vllm")
        if self.vllm_importance_sampling_cap is not None and self.engine != "vllm" and not self.async_steps:
            raise UserError("config: key 'vllm_importance_sampling_cap' needs engine: vllm or async_steps > 0")
        if self.algorithm == "ppo" and (self.advantage != "group" or self.loss_type != "token_mean"):
            raise UserError("config: keys 'advantage' and 'loss_type' are GRPO's; ppo uses GAE and token_mean")
        if self.async_steps < 0 or self.dynamic_sampling_max_tries < 1 or self.overlong_buffer < 0:
            raise UserError("config: keys 'async_steps' and 'overlong_buffer' must be >= 0, "
                            "'dynamic_sampling_max_tries' >= 1")
        if self.overlong_buffer > self.max_completion_length:
            raise UserError(f"config: key 'overlong_buffer' ({self.overlong_buffer}) must be at most "
                            f"max_completion_length ({self.max_completion_length})")
        if self.async_steps and self.engine == "vllm" and not self.vllm_servers:
            raise UserError("config: async_steps with engine vllm needs vllm_servers (the engine in this process "
                            "cannot generate while it trains)")
        if self.async_steps and (self.algorithm == "ppo" or self.dynamic_sampling or self.use_peft):
            raise UserError("config: async_steps is supported for grpo without dynamic_sampling and use_peft")
        if not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in self.vllm_servers):
            raise UserError(f"config: key 'vllm_servers' must be a list of http(s) URLs, got {self.vllm_servers!r}")
        if self.vllm_importance_sampling_cap is not None and self.vllm_importance_sampling_cap < 1:
            raise UserError(f"config: key 'vllm_importance_sampling_cap' must be >= 1, got {self.vllm_importance_sampling_cap}")
        if self.engine == "vllm" and self.use_peft:
            raise UserError("config: engine vllm with use_peft is not supported (the adapter is not pushed to vLLM)")
        if self.env is not None and (self.max_turns < 1 or self.max_episode_tokens < 1):
            raise UserError("config: keys 'max_turns' and 'max_episode_tokens' must be >= 1")
        if self.use_peft and self.beta > 0:
            raise UserError("config: use_peft with beta > 0 is not supported (the reference would share the adapter's base)")

    @property
    def clip_high(self) -> float:
        """The upper clip ``ε_h``: ``epsilon_high``, or DAPO's clip-higher 0.28 for ``dapo``, else ``epsilon``."""
        if self.epsilon_high is not None:
            return self.epsilon_high
        return 0.28 if self.loss_type == "dapo" else self.epsilon


@dataclass
class MidtrainConfig(TrainConfig):
    """Next-token training on plain text (see posttrain.train.midtrain). ``datasets[i].fraction`` is a
    source's share of the rows; ``total_tokens`` (if > 0) sets the number of steps."""

    learning_rate: float = 3e-4
    lr_scheduler_type: Literal["linear", "cosine", "cosine_min", "constant"] = "cosine"
    warmup_ratio: float = 0.01
    weight_decay: float = 0.1
    total_tokens: int = 0
    anneal_from: str | None = None  # a run whose last learning rate starts this (linear-to-zero) anneal

    def validate(self) -> None:
        super().validate()
        if not self.datasets:
            raise UserError("config: key 'datasets' is required: text sources (.txt, or records with 'text')")
        if self.total_tokens < 0:
            raise UserError(f"config: key 'total_tokens' must be >= 0, got {self.total_tokens}")
        if self.anneal_from and (self.lr_scheduler_type != "linear" or self.warmup_ratio):
            raise UserError("config: an anneal (anneal_from) decays linearly to zero: set lr_scheduler_type=linear "
                            "and warmup_ratio=0")
