"""Typed run configuration: dataclasses with a docstring per field, YAML presets, CLI overrides.

Precedence is CLI > file > defaults (torchtitan's rule). Overrides are `section.field=value` with the value
parsed as YAML; named runs (teachers, students) sit one level deeper: `teachers.ce.lr=1e-5`,
`students.s1_ce.strategies=[1,2]`, `eval.k=8`, `onpolicy.loss=grpo`.
Everything is validated up front, before any compute: unknown keys, wrong types, every numeric field against
its allowed range (`RANGES`, one table), impossible combinations (strategy 2 without an unlearned checkpoint,
a mini-batch larger than the batch, unknown loss names, ...) raise `ConfigError` naming the field. YAML is read
strictly (duplicate keys, aliases and oversized files refused: utils/strict_yaml.py) and text / list fields are
capped (`_check_sizes`).
The resolved config is written to `<run_dir>/config.yaml` so a run can be reproduced or resumed.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from erpd_megatron.utils import strict_yaml


class ConfigError(ValueError):
    """A configuration value is missing, malformed or inconsistent; the message names the field."""


TEACHER_LOSSES = ("grpo", "ppo", "sapo", "cispo", "ce", "mse", "sft")
ONPOLICY_LOSSES = ("grpo", "sapo", "ppo", "cispo")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass
class ModelConfig:
    base: str = "toy"
    """HF checkpoint directory of the base policy, or "toy" for the locally warmed-up tiny Qwen3 model ("toy_code":
    its code-task twin, toy/code_base.py)."""
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    dp: int = 1
    """Data-parallel size (world size = tp * pp * dp)."""
    micro_batch_size: int = 64
    """Sequences per micro-batch in Megatron forward/backward (gradient accumulation fills a mini-batch)."""
    fp8: bool = False
    """Transformer Engine FP8 (hybrid format, delayed scaling) for every Megatron model of the run; needs CUDA and
    Transformer Engine, refused otherwise (on CPU) before anything starts."""
    reuse_engines: bool = True
    """Between stages of one process, reset and reload a built policy (model, DDP, optimizer) in place instead
    of building another; results are the same either way (false: build every time, to rule reuse out)."""


@dataclass
class DataConfig:
    train: str = "toy"
    """Prompt dataset (JSONL or Parquet: a prompt and an answer field, optional `id`; or code records with tests;
    docs/data.md), or "toy" / "toy_code" / "long" (generated; "*_val": the validation split)."""
    eval: str = ""
    """Held-out benchmark file (same format), or a generated task's name. "" (unset) = "toy" for the toy base
    (model.base=toy or a dir the toy warm-up wrote); with any other base it is refused (data.eval=toy says it
    explicitly)."""
    prompt_key: str = ""
    """Field of the prompt, a dotted path into nested records: text or a chat-message list (verl's `prompt`).
    "" = the first of problem, prompt, question, messages that the file's first record has."""
    answer_key: str = ""
    """Field of the gold answer (dotted: verl's `reward_model.ground_truth`). "" = the first of answer,
    reward_model.ground_truth, ground_truth, solution, label in the first record."""
    prompts_per_batch: int = 128
    """Prompts in one fixed rollout batch (stage 1 / 2 operate on it)."""
    eval_prompts: int = 256
    """How many eval problems to use (the first N of the file)."""
    instruction: str = "auto"
    """Appended to text prompts before the chat template. "auto" = the \\boxed{} instruction (DEFAULT_INSTRUCTION in
    data/prompts.py), except for the toy task's model, whose prompts are bare arithmetic: the same rule as
    `erpd eval --instruction`; "" = none. Chat-message prompts never get it (they carry their own)."""
    system: str = ""
    """System message put first in every prompt ("" = none; a message list with its own system turn keeps it)."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra chat-template variables, e.g. {enable_thinking: false} for Qwen3 (verl apply_chat_template_kwargs)."""
    max_prompt_length: int = 0
    """Longest prompt in tokens (chat template applied); 0 = the model's positions minus rollout.max_new_tokens."""
    overlong_prompts: str = "refuse"
    """A prompt above max_prompt_length: "refuse" (stop before any compute, naming it) or "filter" (drop it,
    one warning with the count; verl's filter_overlong_prompts)."""


@dataclass
class RolloutConfig:
    engine: str = "local"
    """"local" (in-process transformers engine, CPU default) or "sglang"."""
    n_samples: int = 8
    """Samples per prompt."""
    temperature: float = 1.0
    """Sampling temperature; trainer log-probs use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling (behaviour log-probs are of the unfiltered tempered distribution)."""
    max_new_tokens: int = 40
    """Response length cap."""
    sglang_urls: list[str] = field(default_factory=list)
    """Attach to running SGLang servers (engine=sglang); empty = launch `sglang_num_servers` here."""
    sglang_tp: int = 1
    """TP size of each SGLang server (each server is DP=1: sglang refuses weight updates when dp_size > 1)."""
    sglang_num_servers: int = 1
    """Servers to launch; server k uses GPUs [sglang_base_gpu_id + k * sglang_tp, ...) and port sglang_port + k."""
    sglang_base_gpu_id: int = 0
    """--base-gpu-id of server 0."""
    sglang_host: str = "127.0.0.1"
    """Bind address of launched servers; anything but loopback needs $ERPD_SGLANG_API_KEY (never stored here)."""
    sglang_port: int = 30000
    """Port of server 0."""
    sglang_mem_fraction_static: float = 0.0
    """--mem-fraction-static (weights + KV cache share of each GPU); 0 = sglang's default."""
    sglang_offload: bool = False
    """Colocated: start with --enable-memory-saver and release `sglang_offload_tags` after each generation."""
    sglang_offload_tags: list[str] = field(default_factory=lambda: ["kv_cache", "cuda_graph"])
    """Memory released between generations (add "weights" only if every generation follows a weight push)."""
    sglang_weight_transport: str = "tensor"
    """tensor (colocated, CUDA IPC) | distributed (NCCL broadcast from trainer rank 0) | disk."""
    sglang_dist_master_address: str = ""
    """distributed: address of trainer rank 0 as the servers reach it (default 127.0.0.1)."""
    sglang_dist_master_port: int = 0
    """distributed: free port on trainer rank 0 for the weight-update group (0 = pick one)."""
    sglang_deterministic: bool = False
    """--enable-deterministic-inference: without it sglang ignores per-sample seeds (sampling not reproducible)."""
    sglang_python: str = ""
    """Python interpreter of the environment sglang is installed in (sglang pins its own torch); "" = this one."""
    sglang_extra_args: list[str] = field(default_factory=list)
    """More sglang.launch_server arguments."""
    sglang_device: str = "auto"
    """auto | cuda | cpu. cpu = sglang's CPU path (torch-native layers; `make sglang-env` builds such an
    environment); auto = cpu when this process sees no CUDA device."""
    sglang_startup_timeout: float = 1800.0
    """Seconds a server (launched here, or attached by URL) may take to answer /health at start."""
    sglang_allow_nccl_mismatch: bool = False
    """distributed: join the update group even when trainer and server report different NCCL versions."""
    reward_mode: str = "strict"
    """math-verify mode: "strict" (last \\boxed{} only) or "loose"."""
    verify_weights: bool = True
    """After every weight sync, score `verify_weights_seqs` training prompts on the rollout engine and stop the run if
    its log-probs differ from the trainer's beyond a dtype-aware tolerance (the weights did not arrive intact)."""
    verify_weights_seqs: int = 4
    """Prompts (at most 64 tokens each) the weight check scores; at least one per SGLang server is used."""
    verify_weights_tol: float = 0.0
    """Mean |log-prob difference| per token the weight check allows (the max scales alike); 0 = by dtype (fp32 1e-3,
    bf16 / fp16 0.05)."""


@dataclass
class RewardConfig:
    """Which reward scores a record (rewards/router.py) and the code reward's settings (rewards/code.py)."""

    custom: str = ""
    """A custom reward function, "module:function" or "path/to/file.py:function", with verl's signature
    fn(data_source, solution_str, ground_truth, extra_info) -> float | {"score": float, ...}; run in the reward's
    worker pool (timeouts and exceptions score 0 and are counted). "" = math-verify only."""
    custom_sources: list[str] = field(default_factory=list)
    """`data_source` values scored by `custom`; empty = every record (when `custom` is set)."""
    timeout_s: float = 5.0
    """Per-response wall-clock budget of either reward (past it: score 0, worker replaced)."""

    default: str = "math"
    """Reward of a record that neither its data_source nor its test cases route: math | code | custom."""
    routes: dict[str, str] = field(default_factory=dict)
    """data_source -> math | code | custom, before the built-in verl names (rewards/router.DATA_SOURCE_ROUTES)."""
    code_score: str = "binary"
    """binary (1 when every test passes, pass@1) | fraction (tests passed / tests)."""
    code_language: str = "python"
    """Fence tag of the program taken from a response (the last such block; else the last untagged one)."""
    code_workers: int = 2
    """Sandboxes running at once."""
    code_timeout_per_test_s: float = 6.0
    """Wall limit of one test (the CPU-seconds rlimit is this + 1)."""
    code_timeout_per_sample_s: float = 60.0
    """Wall limit of all tests of one response; past it the whole sandbox is killed."""
    code_memory_mb: int = 1024
    """Address-space rlimit of each test process (MiB)."""
    sandbox: str = "bwrap"
    """bwrap (bubblewrap; refuses to run where it cannot start) | none (UNSANDBOXED, warned on every batch)."""
    sandbox_python: str = "/usr/bin/python3"
    """Interpreter that runs the programs inside the sandbox (Debian's python3; standard library only)."""


@dataclass
class TeacherConfig:
    loss: str = "ce"
    """Stage-1 loss: grpo | ppo | sapo | cispo | ce | mse | sft (SFT on positives, the Tab. 9 recovery)."""
    steps: int = 60
    """Optimizer steps over the fixed batch (mini-batches cycle through it, epochs as needed)."""
    mini_batch_size: int = 256
    """Sequences per optimizer step."""
    lr: float = 1e-4
    """Adam learning rate."""
    warmup_steps: int = 0
    """Linear LR warm-up steps."""
    beta: float = 0.05
    """CE / MSE scale on the summed log-ratio (paper: 0.001-0.05)."""
    beta_ref_len: float = 20000.0
    """CE / MSE with ce_reduce "sum": length-aware beta, s(y) = beta * (beta_ref_len / |y|) * sum_t log-ratio, so
    beta regularises per token as the paper's beta does on its ~20k-token answers (default 20000; 0 = off,
    the literal eq. 3 sum, under which a 25-token answer is regularised ~1000x less per token)."""
    mse_targets: list[float] = field(default_factory=lambda: [-1.0, 1.0])
    """MSE: regression targets [wrong, correct] for R(y) in eq. 10. The score starts at 0, so with [0, 1] the
    negatives get no gradient at step 0 and the unlearning phase of paper Fig. 5 cannot happen; the default
    [-1, 1] lets the negatives' gradients dominate early, as the paper describes (Sec. 3.4)."""
    agg: str = "auto"
    """Policy-loss aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum, or "auto" = the loss's
    own default (sapo: seq-mean-token-mean; grpo / ppo / cispo: token-mean), or seq-mean-token-sum-norm (Dr. GRPO's
    constant normaliser, verl's name: each response's token sum / `agg_norm_len`, mean over responses). CE / MSE
    reduce per sequence (`ce_reduce`) and ignore it."""
    agg_norm_len: int = 0
    """seq-mean-token-sum-norm's constant divisor C (Dr. GRPO's MAX_TOKENS); 0 = rollout.max_new_tokens."""
    ce_reduce: str = "sum"
    """CE: aggregate the log-ratio over tokens by "sum" (paper eq. 3) or "mean"."""
    eps_low: float = 0.2
    """PPO/GRPO lower clip."""
    eps_high: float = 0.28
    """PPO/GRPO upper clip."""
    tau_pos: float = 1.0
    """SAPO gate temperature for A > 0."""
    tau_neg: float = 1.05
    """SAPO gate temperature for A < 0."""
    kl_coef: float = 0.0
    """Optional KL(pi || pi_old) loss weight in stage 1."""
    save_every: int = 10
    """Checkpoint (and keep) every k steps; early ones are the unlearned policies for strategy 2."""
    negative_weight: float = 1.0
    """Weight of negative samples (unlearning strength, paper Tab. 9)."""
    init: str = "base"
    """Start from "base" or from another teacher's checkpoint, "<teacher_name>@<step>" (recovery teachers)."""
    critic_steps: int = 20
    """PPO: value pre-training steps on the fixed batch (lambda_critic = 1) before the policy trains."""
    critic_lr: float = 1e-4
    """PPO: critic Adam learning rate."""
    gae_alpha: float = 0.05
    """PPO: length-adaptive policy lambda = 1 - 1 / (alpha * response length) (paper Sec. 4.1)."""
    early_stop_patience: int = 0
    """Stop when eval accuracy has not improved for this many evaluations (0 = off). The eval set serves as
    the validation set (as the paper's HMMT Feb 25); students then use the last checkpoint saved."""


@dataclass
class DistillConfig:
    strategies: list[int] = field(default_factory=lambda: [1])
    """Signals: 1 = log pi_T - log pi_old, 2 = log pi_T - log pi_U, 3 = log pi_cur - log pi_weak."""
    ensemble: str = "sum"
    """How several strategies combine: "sum" of whitened signals or "sequential" (steps split evenly)."""
    teacher: str = "ce"
    """Name of the stage-1 teacher run (a key of `teachers`) whose last checkpoint is pi_T; "<name>@<step>" names
    one of its checkpoints (the same as `teacher_step`; the config is stored resolved: name and teacher_step)."""
    teacher_step: int = -1
    """Teacher checkpoint step (-1 = last)."""
    unlearned_step: int = -1
    """Strategy 2: step of the teacher's early checkpoint used as pi_U; -1 = the bottom of the unlearning dip:
    the saved step before the teacher's own at which the positives' mean token log-prob on the fixed batch is
    lowest (paper Sec. 3.4 / Fig. 5; chosen on the training batch, not the eval set)."""
    unlearned: str = ""
    """Strategy 2: pi_U as "<teacher>@<step>" (or "<teacher>" = its last checkpoint): a checkpoint of ANY configured
    teacher run, typically a short unlearning run from the same base with its own lr / negative_weight / steps (the
    paper's tuning, Sec. 4.5 / Tab. 9 / Tab. 11: one recovered policy at a fixed lr, plus several ~10-step unlearned
    runs at other lrs). "" = a checkpoint of `teacher`'s own run, chosen by `unlearned_step`."""
    weak: str = ""
    """Strategy 3: checkpoint directory of the weaker earlier policy."""
    sign_mask: str = "none"
    """Keep only "pos" / "neg" signal parts on positive samples (paper Tab. 12), or "none"."""
    steps: int = 16
    """Distillation optimizer steps. The paper runs students for at most about one epoch over the fixed batch:
    16 or 32 steps (Sec. 4.1), 10 when iterating (Sec. 4.4)."""
    mini_batch_size: int = 0
    """Sequences per step; 0 = one epoch: (data.prompts_per_batch * rollout.n_samples) // steps (see
    `student_mini_batch`). More than ~1.5 epochs logs a warning."""
    lr: float = 3e-5
    """Adam learning rate."""
    eps_low: float = 0.2
    """PPO clip (lower)."""
    eps_high: float = 0.28
    """PPO clip (upper)."""
    kl_coef: float = 0.0
    """KL(pi || pi_old) loss weight (paper Tab. 5: 0.05-0.2)."""
    kl_estimator: str = "k3"
    """k1 | k2 | k3."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (paper Tab. 6b uses 0.5)."""
    signal_clip: float = 0.0
    """Clip whitened signals to [-c, c] (0 = off)."""


@dataclass
class OnPolicyConfig:
    loss: str = "grpo"
    """On-policy baseline loss: grpo | sapo | ppo | cispo."""
    steps: int = 0
    """Rollout -> one update iterations (0 = the ERPD budget: prompts_per_batch / prompts_per_step, so both
    methods consume prompts_per_batch * n_samples rollouts)."""
    prompts_per_step: int = 16
    """Prompts per on-policy step."""
    lr: float = 3e-5
    """Adam learning rate."""


@dataclass
class EvalConfig:
    k: int = 4
    """Samples per problem for AVG@K / pass@K."""
    temperature: float = 1.0
    """Eval sampling temperature."""
    top_p: float = 1.0
    """Eval nucleus sampling."""
    every: int = 10
    """Evaluate every k optimizer steps in teacher / distill / on-policy runs (0 = only at the end)."""


@dataclass
class IterateConfig:
    promote: str = ""
    """Student whose final checkpoint becomes the next iteration's base ("" = the first configured student), or a
    teacher "<name>[@<step>]" (its last / that checkpoint): iterating the teacher itself, without distillation, the
    control of the paper's Table 2 (a) / (b)."""
    fallback: str = ""
    """Student promoted instead when the teacher of `promote` gained less than `min_teacher_gain` accuracy over the
    base on the eval set (the paper's switch from strategy 1 to strategies 2/3 when no strong teacher emerges)."""
    min_teacher_gain: float = 0.0
    """Accuracy gain (absolute, e.g. 0.01 = 1 point) the teacher must show for `promote` to be used."""
    online_steps: int = 0
    """On-policy steps run between offline iterations, starting from the promoted student (0 = offline only);
    their result becomes the next base (paper Sec. 4.4, online / offline switching)."""


@dataclass
class WandbConfig:
    mode: str = "disabled"
    """Weights & Biases: "online", "offline" (files under <run_dir>/wandb/, `wandb sync` later) or "disabled"
    (wandb is then never imported). One W&B run per method, grouped by the run dir's name."""
    project: str = "erpd"
    """W&B project."""
    entity: str = ""
    """W&B team or user ("" = the logged-in default)."""
    group: str = ""
    """W&B group of this run's methods ("" = the run dir's name)."""


@dataclass
class LoggingConfig:
    log_every: int = 1
    """Print one console line every N optimizer steps (JSONL, TensorBoard and W&B get every step)."""
    progress: str = "auto"
    """Progress bars: "auto" (only when stderr is a terminal), "always" or "never" (not on/off: YAML reads those
    as booleans)."""
    report_kl: str = "token"
    """KL axis of the report's plot: "token" (per response token) or "sequence" (summed over the response)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    keep_last: int = 0
    """Keep only the newest N checkpoints of each method (0 = keep all; each holds the optimizer state too).
    Never deleted: the steps other stages read, i.e. the unlearned checkpoint of a strategy-2 student (every
    checkpoint of its teacher when unlearned_step = -1 picks the dip among them), an explicit teacher_step, and
    `init: "<teacher>@<step>"` sources. May change on resume (results do not depend on it)."""


@dataclass
class RunConfig:
    run_dir: str = "runs/erpd"
    """Everything a run writes: config, rollouts, checkpoints, signals, metrics, eval, report."""
    seed: int = 1234
    """Global seed (sampling, init, data order)."""
    iterations: int = 1
    """ERPD batches (the student becomes the next base)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=lambda: {"ce": TeacherConfig()})
    """Named stage-1 runs over the same fixed batch (e.g. {"ce": ..., "mse": ...})."""
    students: dict[str, DistillConfig] = field(default_factory=lambda: {"s1_ce": DistillConfig()})
    """Named stage-2 distillations (each from the base policy)."""
    onpolicy: OnPolicyConfig | None = None
    """On-policy baseline with the same rollout budget (None = skip)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Console, progress bars, experiment tracking; may change when resuming (results do not depend on it)."""


# ----------------------------------------------------------------------------- allowed ranges
# Every int / float field of every section has an interval here ("[lo, hi]", "(lo, hi)", "inf" allowed);
# `validate` checks each value (NaN and +-inf never pass an open bound) and names the field and the interval.
# tests/test_config.py walks all numeric fields and fails on one without an entry.
_POS, _NONNEG, _ONE_UP, _LR = "(0, inf)", "[0, inf)", "[1, inf)", "(0, 1]"
# Upper bounds where a value means nothing beyond them. Steps: eval files are step_%06d.json (a 7-digit step
# would sort before a 6-digit one). Samples per prompt / problem: 65536 (a batch's memory is checked against the
# machine by pipeline/checks.check_memory). Response length: 2^20 tokens (and below the model's positions,
# pipeline/checks.check_prompt_lengths).
_STEPS, _STEPS_ONE_UP, _SAMPLES, _TOKENS = "[0, 999999]", "[1, 999999]", "[1, 65536]", "[1, 1048576]"
RANGES: dict[type, dict[str, str]] = {
    ModelConfig: {"tp": _ONE_UP, "pp": _ONE_UP, "dp": _ONE_UP, "micro_batch_size": _ONE_UP},
    DataConfig: {"prompts_per_batch": _ONE_UP, "eval_prompts": _ONE_UP, "max_prompt_length": _NONNEG},
    RolloutConfig: {"n_samples": _SAMPLES, "temperature": _POS, "top_p": "(0, 1]", "max_new_tokens": _TOKENS,
                    "sglang_tp": _ONE_UP, "sglang_num_servers": _ONE_UP, "sglang_base_gpu_id": _NONNEG,
                    "sglang_port": "[1, 65535]", "sglang_mem_fraction_static": "[0, 1)",
                    "sglang_dist_master_port": "[0, 65535]", "sglang_startup_timeout": _POS,
                    "verify_weights_seqs": _ONE_UP,
                    "verify_weights_tol": _NONNEG},
    RewardConfig: {"timeout_s": _POS, "code_workers": _ONE_UP, "code_timeout_per_test_s": _POS, "code_timeout_per_sample_s": _POS,
                   "code_memory_mb": "[64, inf)"},
    TeacherConfig: {
        "steps": _STEPS, "mini_batch_size": _ONE_UP, "lr": _LR, "warmup_steps": _STEPS, "beta": _POS, "beta_ref_len": _NONNEG,
        "eps_low": "[0, 1)", "eps_high": _NONNEG, "tau_pos": _POS, "tau_neg": _POS, "kl_coef": _NONNEG,
        "save_every": _STEPS_ONE_UP, "negative_weight": _NONNEG, "critic_steps": _STEPS, "critic_lr": _LR,
        "agg_norm_len": _NONNEG, "gae_alpha": _POS, "early_stop_patience": _STEPS,
    },
    DistillConfig: {
        "teacher_step": "[-1, 999999]", "unlearned_step": "[-1, 999999]", "steps": _STEPS, "mini_batch_size": _NONNEG,
        "lr": _LR, "eps_low": "[0, 1)", "eps_high": _NONNEG, "kl_coef": _NONNEG, "entropy_coef": _NONNEG,
        "signal_clip": _NONNEG,
    },
    OnPolicyConfig: {"steps": _STEPS, "prompts_per_step": _ONE_UP, "lr": _LR},
    EvalConfig: {"k": _SAMPLES, "temperature": _POS, "top_p": "(0, 1]", "every": _STEPS},
    IterateConfig: {"min_teacher_gain": "[-1, 1]", "online_steps": _STEPS},
    RunConfig: {"seed": "[0, 4294967295]", "iterations": _STEPS_ONE_UP},
    LoggingConfig: {"log_every": _ONE_UP},
    CheckpointConfig: {"keep_last": _NONNEG},
}


def in_range(value: float, interval: str) -> bool:
    """`value` lies in `interval`, written "[lo, hi)" etc. NaN lies in none."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = lo < value if interval[0] == "(" else lo <= value
    below = value < hi if interval[-1] == ")" else value <= hi
    return above and below


def _check_ranges(obj, where: str) -> None:
    """Every ranged field of `obj` and of the sections / named runs it holds (depth first, in field order)."""
    ranges = RANGES.get(type(obj), {})
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), f"{where}{f.name}"
        if f.name in ranges and not in_range(value, ranges[f.name]):
            raise ConfigError(f"{path}={value!r} is out of range: allowed {ranges[f.name]}")
        if dataclasses.is_dataclass(value):
            _check_ranges(value, path + ".")
        elif isinstance(value, dict):
            for name, sub in value.items():
                if dataclasses.is_dataclass(sub):
                    _check_ranges(sub, f"{path}.{name}.")


# Text and list fields are short (paths, names, an instruction, a few URLs or flags): anything larger is a mistake
# and is refused naming the field before it is used (a 10 MB `data.instruction` would otherwise be tokenized with
# every prompt, and an error quoting a 3-million-element list would be megabytes).
MAX_TEXT_CHARS = 65_536
MAX_LIST_ITEMS = 4_096


def _check_sizes(obj, where: str) -> None:
    """Every str / list field of `obj` and of the sections / named runs it holds against the caps above."""
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), f"{where}{f.name}"
        if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
            raise ConfigError(f"{path} is {len(value)} characters long: at most {MAX_TEXT_CHARS}")
        if isinstance(value, list):
            if len(value) > MAX_LIST_ITEMS:
                raise ConfigError(f"{path} has {len(value)} items: at most {MAX_LIST_ITEMS}")
            for i, v in enumerate(value):
                if isinstance(v, str) and len(v) > MAX_TEXT_CHARS:
                    raise ConfigError(f"{path}[{i}] is {len(v)} characters long: at most {MAX_TEXT_CHARS}")
        if dataclasses.is_dataclass(value):
            _check_sizes(value, path + ".")
        elif isinstance(value, dict):
            if len(value) > MAX_LIST_ITEMS:
                raise ConfigError(f"{path} has {len(value)} entries: at most {MAX_LIST_ITEMS}")
            for name, sub in value.items():
                if len(name) > 256:
                    raise ConfigError(f"{path}: a name of {len(name)} characters: at most 256")
                if dataclasses.is_dataclass(sub):
                    _check_sizes(sub, f"{path}.{name}.")


# ----------------------------------------------------------------------------- (de)serialisation


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _coerce(tp, value, where: str):
    """Turn a YAML value into `tp`, raising ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of name -> settings")
        if vt is typing.Any:  # free-form (chat-template kwargs): values as YAML gave them (false stays false)
            return {str(k): v for k, v in value.items()}
        return {str(k): _coerce(vt, v or {}, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        (et,) = typing.get_args(tp)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(et, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str = ""):
    """`where`: the path of `data` in the config ("" = top level), so errors name `model.tp`, not a Python path."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_path(d: dict, path: list[str], value):
    for key in path[:-1]:
        d = d.setdefault(key, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {'.'.join(path)}: {key} is not a section")
    d[path[-1]] = value


def load_config(path: str | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """defaults <- base dict (e.g. a recipe) <- YAML file <- `a.b=value` overrides; then validate."""
    data: dict = {}
    if base:
        data = _deep_merge(data, base)
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:  # duplicate keys, aliases, oversized files refused (utils/strict_yaml.py)
            loaded = strict_yaml.load(p.read_bytes()) or {}
        except strict_yaml.StrictYAMLError as e:
            raise ConfigError(f"{p}: {e}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        data = _deep_merge(data, loaded)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. teachers.ce.lr=1e-5)")
        key, raw = item.split("=", 1)
        try:
            value = strict_yaml.load(raw)
        except (strict_yaml.StrictYAMLError, yaml.YAMLError) as e:
            raise ConfigError(f"override {key.strip()}: {e}") from None
        _set_path(data, key.strip().split("."), value)
    cfg = from_dict(RunConfig, data)
    if not cfg.data.eval and is_toy_base(cfg.model.base):
        cfg.data.eval = "toy"  # unset is "toy" for the toy base only; validate refuses it for any other base
    validate(cfg)
    return cfg


def is_toy_base(base: str) -> bool:
    """"toy", or an HF directory the toy warm-up wrote (it holds the warm-up's record, toy/warmup.py WARMUP_JSON):
    a model of the toy task, for which an unset data.eval means the toy problems."""
    return base == "toy" or (Path(base) / "warmup.json").is_file()


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def save_config(cfg: RunConfig, path: Path) -> None:
    from erpd_megatron.utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- validation


log = logging.getLogger("erpd.config")
# Students beyond this many passes over the fixed batch get a warning (the paper: at most about one epoch).
STUDENT_MAX_EPOCHS = 1.5


def student_mini_batch(cfg: RunConfig, s: DistillConfig) -> int:
    """A student's sequences per step: its mini_batch_size, or for 0 the one-epoch size batch // steps."""
    rows = cfg.data.prompts_per_batch * cfg.rollout.n_samples
    return s.mini_batch_size or max(1, rows // max(s.steps, 1))


def student_epochs(cfg: RunConfig, s: DistillConfig) -> float:
    """Passes a student makes over the fixed batch: steps * mini-batch / (prompts_per_batch * n_samples)."""
    return s.steps * student_mini_batch(cfg, s) / (cfg.data.prompts_per_batch * cfg.rollout.n_samples)


def checkpoint_ref(ref: str) -> tuple[str, int]:
    """"<run>@<step>" -> (run, step); "<run>" -> (run, -1), -1 meaning the run's last checkpoint."""
    name, sep, step = ref.partition("@")
    if not sep:
        return name, -1
    if not step.lstrip("-").isdigit():
        raise ConfigError(f"{ref!r}: expected '<run>@<step>' with an integer step")
    return name, int(step)


def _saved_step(t: TeacherConfig, step: int) -> bool:
    """`step` is a checkpoint a teacher run writes (every save_every, and its last step), or -1 = the last."""
    return step == -1 or (0 < step <= t.steps and (step % t.save_every == 0 or step == t.steps))


def _resolve_student_refs(cfg: RunConfig) -> None:
    """students.*.teacher "<name>@<step>" -> teacher <name> + teacher_step <step> (stored resolved, so a saved
    config reloads to the same thing)."""
    for name, s in cfg.students.items():
        if "@" in s.teacher:
            t, step = checkpoint_ref(s.teacher)
            if s.teacher_step not in (-1, step):
                raise ConfigError(f"students.{name}: teacher {s.teacher!r} and teacher_step={s.teacher_step} disagree")
            s.teacher, s.teacher_step = t, step


_WARNED: set[str] = set()


def _warn_once(fmt: str, *args) -> None:
    """A config warning, once per process: the config is loaded more than once per command (parse, resume
    check, the torchrun relaunch), and a note repeated says nothing new."""
    text = fmt % args
    if text not in _WARNED:
        _WARNED.add(text)
        log.warning("%s", text)


def validate(cfg: RunConfig) -> None:
    """All checks that can run before any compute (and `teacher: "<name>@<step>"` resolved, see above)."""
    _check_sizes(cfg, "")
    _resolve_student_refs(cfg)
    _check_ranges(cfg, "")
    if cfg.rollout.engine not in ("local", "sglang"):
        raise ConfigError(f"rollout.engine must be 'local' or 'sglang', got {cfg.rollout.engine!r}")
    if cfg.rollout.sglang_weight_transport not in ("tensor", "distributed", "disk"):
        raise ConfigError("rollout.sglang_weight_transport must be tensor, distributed or disk, "
                          f"got {cfg.rollout.sglang_weight_transport!r}")
    if cfg.rollout.sglang_device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"rollout.sglang_device must be auto, cuda or cpu, got {cfg.rollout.sglang_device!r}")
    bad_tags = sorted(set(cfg.rollout.sglang_offload_tags) - {"weights", "kv_cache", "cuda_graph"})
    if bad_tags:
        raise ConfigError(f"rollout.sglang_offload_tags: unknown tag(s) {bad_tags}; allowed weights, kv_cache, cuda_graph")
    if cfg.data.overlong_prompts not in ("refuse", "filter"):
        raise ConfigError(f"data.overlong_prompts must be 'refuse' or 'filter', got {cfg.data.overlong_prompts!r}")
    if not cfg.data.eval and not is_toy_base(cfg.model.base):
        raise ConfigError(f"data.eval is not set: give a benchmark file to evaluate model.base={cfg.model.base} on "
                          "(or data.eval=toy to score it on the toy problems)")
    if cfg.rollout.reward_mode not in ("strict", "loose"):
        raise ConfigError(f"rollout.reward_mode must be 'strict' or 'loose', got {cfg.rollout.reward_mode!r}")
    rw = cfg.reward
    for where, value, allowed in (("reward.code_score", rw.code_score, ("binary", "fraction")),
                                  ("reward.sandbox", rw.sandbox, ("bwrap", "none")),
                                  ("reward.default", rw.default, ("math", "code", "custom")),
                                  *((f"reward.routes.{k}", v, ("math", "code", "custom")) for k, v in rw.routes.items())):
        if value not in allowed:
            raise ConfigError(f"{where} must be one of {list(allowed)}, got {value!r}")
    # one fixed batch holds prompts_per_batch * n_samples sequences; a larger mini-batch would silently be clamped
    batch_rows = cfg.data.prompts_per_batch * cfg.rollout.n_samples
    too_big = "exceeds the fixed batch (data.prompts_per_batch * rollout.n_samples = {})"
    for name, t in cfg.teachers.items():
        where = f"teachers.{name}"
        if t.loss not in TEACHER_LOSSES:
            raise ConfigError(f"{where}.loss: unknown loss {t.loss!r}; valid: {list(TEACHER_LOSSES)}")
        if t.agg not in (*AGG_MODES, "auto"):
            raise ConfigError(f"{where}.agg: unknown aggregation {t.agg!r}; valid: {list(AGG_MODES)}")
        if len(t.mse_targets) != 2 or not t.mse_targets[0] < t.mse_targets[1]:
            raise ConfigError(f"{where}.mse_targets must be [wrong, correct] with wrong < correct, got {t.mse_targets}")
        if t.ce_reduce not in ("sum", "mean"):
            raise ConfigError(f"{where}.ce_reduce must be 'sum' or 'mean'")
        if t.mini_batch_size > batch_rows:
            raise ConfigError(f"{where}.mini_batch_size={t.mini_batch_size} {too_big.format(batch_rows)}")
        if t.init != "base":
            src, _, step = t.init.partition("@")
            if src not in cfg.teachers or src == name or not step.lstrip("-").isdigit():
                raise ConfigError(f"{where}.init: expected 'base' or '<other teacher>@<step>', got {t.init!r}")
    for name, s in cfg.students.items():
        where = f"students.{name}"
        bad = [x for x in s.strategies if x not in (1, 2, 3)]
        if not s.strategies or bad:
            raise ConfigError(f"{where}.strategies: expected a non-empty list from [1, 2, 3], got {s.strategies}")
        if s.ensemble not in ("sum", "sequential"):
            raise ConfigError(f"{where}.ensemble must be 'sum' or 'sequential'")
        if s.sign_mask not in ("none", "pos", "neg"):
            raise ConfigError(f"{where}.sign_mask must be none | pos | neg")
        if s.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"{where}.kl_estimator must be k1 | k2 | k3")
        if s.mini_batch_size > batch_rows:
            raise ConfigError(f"{where}.mini_batch_size={s.mini_batch_size} {too_big.format(batch_rows)}")
        if (1 in s.strategies or 2 in s.strategies) and s.teacher not in cfg.teachers:
            raise ConfigError(f"{where}.teacher: {s.teacher!r} is not a configured teacher {sorted(cfg.teachers)}")
        if s.teacher_step > 0 and s.teacher in cfg.teachers and not _saved_step(cfg.teachers[s.teacher], s.teacher_step):
            t = cfg.teachers[s.teacher]
            raise ConfigError(f"{where}.teacher_step={s.teacher_step} is not a saved step of teacher {s.teacher!r} "
                              f"(saves every {t.save_every} up to {t.steps})")
        if s.unlearned:
            u, ustep = checkpoint_ref(s.unlearned)
            if 2 not in s.strategies:
                raise ConfigError(f"{where}.unlearned is set but strategy 2 is not in strategies {s.strategies}")
            if u not in cfg.teachers:
                raise ConfigError(f"{where}.unlearned: {u!r} is not a configured teacher {sorted(cfg.teachers)}")
            if not _saved_step(cfg.teachers[u], ustep):
                t = cfg.teachers[u]
                raise ConfigError(f"{where}.unlearned: step {ustep} is not a saved step of teacher {u!r} (saves every "
                                  f"{t.save_every} up to {t.steps})")
        elif 2 in s.strategies:
            t = cfg.teachers[s.teacher]
            if s.unlearned_step == -1:
                if t.steps <= t.save_every:
                    raise ConfigError(
                        f"{where}: strategy 2 needs an unlearned checkpoint before the teacher's last, but teacher "
                        f"{s.teacher!r} saves every {t.save_every} up to {t.steps} (unlearned_step=-1 picks the dip)"
                    )
            elif s.unlearned_step <= 0 or s.unlearned_step % t.save_every or s.unlearned_step > t.steps:
                raise ConfigError(
                    f"{where}: strategy 2 needs an unlearned checkpoint, but unlearned_step={s.unlearned_step} is not "
                    f"a saved step of teacher {s.teacher!r} (saves every {t.save_every} up to {t.steps})"
                )
        if 3 in s.strategies and not s.weak:
            raise ConfigError(f"{where}: strategy 3 needs `weak` (a checkpoint of a weaker earlier policy)")
        if 1 in s.strategies and s.teacher in cfg.teachers and cfg.teachers[s.teacher].loss == "mse":
            _warn_once("%s uses strategy 1 over the MSE teacher %r: the paper reports that this pairing does not help "
                        "(Sec. 3.4); strategy 1 goes with strong teachers (ce / sapo / grpo), strategy 2 "
                        "(teacher over its unlearned checkpoint) with MSE teachers", where, s.teacher)
        epochs = student_epochs(cfg, s)
        if epochs > STUDENT_MAX_EPOCHS:
            _warn_once("%s runs %.1f epochs over the fixed batch (%d steps x %d sequences of %d); the paper's students "
                        "run at most about one (16-32 steps, 10 when iterating): lower steps or mini_batch_size "
                        "(0 = one epoch)", where, epochs, s.steps, student_mini_batch(cfg, s), batch_rows)
    for key in ("promote", "fallback"):
        name = getattr(cfg.iterate, key)
        if not name or name in cfg.students:
            continue
        run, step = checkpoint_ref(name)  # a teacher itself (no distillation: the paper's Table 2 (a) / (b) control)
        if run not in cfg.teachers:
            raise ConfigError(f"iterate.{key}: {name!r} is neither a configured student {sorted(cfg.students)} nor a "
                              f"teacher '<name>[@<step>]' of {sorted(cfg.teachers)}")
        if not _saved_step(cfg.teachers[run], step):
            raise ConfigError(f"iterate.{key}: step {step} is not a saved step of teacher {run!r}")
    if cfg.iterations > 1 and not cfg.iterate.promote and not cfg.students:
        raise ConfigError("iterations > 1 needs a policy to promote: iterate.promote (a student or a teacher) or a student")
    if cfg.iterate.online_steps and cfg.onpolicy is None:
        raise ConfigError("iterate.online_steps needs an `onpolicy` section (its loss, lr, prompts_per_step)")
    lg = cfg.logging
    for key, value, valid in (("mode", lg.wandb.mode, ("online", "offline", "disabled")),
                              ("progress", lg.progress, ("auto", "always", "never")),
                              ("report_kl", lg.report_kl, ("token", "sequence"))):
        if value not in valid:
            raise ConfigError(f"logging.{'wandb.' if key == 'mode' else ''}{key}: {value!r} is not one of {list(valid)}")
    if cfg.onpolicy is not None and cfg.onpolicy.loss not in ONPOLICY_LOSSES:
        raise ConfigError(f"onpolicy.loss: unknown loss {cfg.onpolicy.loss!r}; valid: {list(ONPOLICY_LOSSES)}")
    if cfg.onpolicy is not None and cfg.onpolicy.prompts_per_step > cfg.data.prompts_per_batch:
        # the baseline draws its prompts from the fixed batch's prompts: more per step would repeat prompts
        raise ConfigError(f"onpolicy.prompts_per_step={cfg.onpolicy.prompts_per_step} exceeds "
                          f"data.prompts_per_batch={cfg.data.prompts_per_batch} (its prompts come from that batch)")
