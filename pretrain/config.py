"""The run configuration: every section of a pre-training run, loaded from YAML.

``load_config(path, overrides)`` reads a YAML file, applies ``section.key=value``
overrides, builds the typed dataclasses (unknown keys and wrong types rejected)
and validates values across sections. Errors are :class:`ConfigError` with one
line naming the key, the bad value and what is allowed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Sequence

import yaml

from polytron.data.config import DataConfig
from polytron.model.config import ModelConfig
from polytron.model.configlib import (
    ConfigError,
    apply_override,
    bad,
    doc,
    from_dict,
    load_yaml,
    parse_override,
    to_dict,
)
from polytron.parallel.config import ParallelConfig
from polytron.parallel.fp8 import FP8Config, cp_refusal
from polytron.pretrain.evaluation import EvaluationConfig, resolve_evaluation_paths


@dataclass
class OptimizerConfig:
    """AdamW. Norm weights, biases and other 1-D parameters get no weight decay."""
    lr: float = field(default=3e-4, metadata=doc("Peak learning rate."))
    min_lr: float = field(default=3e-5, metadata=doc("Learning rate at the end of decay."))
    weight_decay: float = field(default=0.1, metadata=doc("Decoupled weight decay on matrices."))
    beta1: float = field(default=0.9, metadata=doc("Adam beta1."))
    beta2: float = field(default=0.95, metadata=doc("Adam beta2."))
    eps: float = field(default=1e-8, metadata=doc("Adam epsilon."))
    grad_clip: float = field(default=1.0, metadata=doc("Global gradient-norm clip; 0 disables."))

    def validate(self) -> None:
        if self.lr <= 0:
            raise bad("optimizer.lr", self.lr, "a positive number")
        if not 0 <= self.min_lr <= self.lr:
            raise bad("optimizer.min_lr", self.min_lr, f"a number in [0, optimizer.lr={self.lr}]")
        if self.weight_decay < 0:
            raise bad("optimizer.weight_decay", self.weight_decay, "a number >= 0")
        for k in ("beta1", "beta2"):
            if not 0 <= getattr(self, k) < 1:
                raise bad(f"optimizer.{k}", getattr(self, k), "a number in [0, 1)")
        if self.eps <= 0:
            raise bad("optimizer.eps", self.eps, "a positive number")
        if self.grad_clip < 0:
            raise bad("optimizer.grad_clip", self.grad_clip, "a number >= 0 (0 disables)")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule over ``training.iterations``."""
    kind: str = field(default="cosine", metadata=doc(
        "A registered schedule (pretrain.schedule.register_schedule; a model.plugins module may add "
        "one). cosine: warmup then cosine to min_lr; wsd: warmup-stable-decay; constant: warmup then flat; "
        "two_stage: BitNet b1.58's recipe: warmup, cosine from lr (toward min_lr at the end of the "
        "run), at stage2_start a drop to stage2_lr and a cosine from there to min_lr, with the "
        "weight decay of matrices set to stage2_weight_decay in stage 2."))
    warmup_iters: int = field(default=100, metadata=doc("Linear warmup from 0 to lr."))
    decay_iters: int = field(default=0, metadata=doc(
        "cosine: iterations of decay after warmup (0 = until training.iterations); "
        "wsd: length of the final decay phase (0 = 20% of training.iterations)."))
    wsd_decay_shape: Literal["linear", "cosine", "sqrt"] = field(default="linear", metadata=doc(
        "Shape of the WSD decay phase."))
    stage2_start: float = field(default=0.5, metadata=doc(
        "two_stage: fraction of training.iterations at which stage 2 begins (mid-training)."))
    stage2_lr: float = field(default=0.0, metadata=doc(
        "two_stage: learning rate stage 2 starts from (the drop); required > 0 with two_stage."))
    stage2_weight_decay: float = field(default=0.0, metadata=doc(
        "two_stage: weight decay of the decaying (matrix) parameters in stage 2; 0 switches it off "
        "as in the paper."))

    def validate(self) -> None:
        if self.warmup_iters < 0:
            raise bad("schedule.warmup_iters", self.warmup_iters, "an integer >= 0")
        if self.decay_iters < 0:
            raise bad("schedule.decay_iters", self.decay_iters, "an integer >= 0")
        from polytron.pretrain.schedule import SCHEDULES
        if self.kind not in SCHEDULES:
            raise bad("schedule.kind", self.kind, "one of " + ", ".join(repr(k) for k in SCHEDULES))
        SCHEDULES[self.kind].validate(self)


#: Longest run accepted: more steps than any pre-training run has taken by 100x.
MAX_ITERATIONS = 10**9
#: Most training tokens accepted: about 70x the largest published pre-training runs (~15T).
MAX_TRAIN_TOKENS = 10**15


def check_run_length(iterations: int, global_batch: int, seq_len: int) -> None:
    """Refuse a run whose token count no cluster would finish (before any data is built)."""
    tokens = iterations * global_batch * seq_len
    if tokens > MAX_TRAIN_TOKENS:
        raise bad("training.iterations", iterations,
                  f"a run of at most {MAX_TRAIN_TOKENS:.0e} tokens; {iterations} x global batch "
                  f"{global_batch} x seq {seq_len} = {tokens:.2e} tokens")


@dataclass
class TrainingConfig:
    """Length, batching, evaluation and outputs of the run."""
    iterations: int = field(default=1000, metadata=doc("Optimizer steps to train."))
    micro_batch_size: int = field(default=4, metadata=doc("Samples per forward pass per data-parallel rank."))
    global_batch_size: int = field(default=0, metadata=doc(
        "Samples per optimizer step over all ranks; 0 means micro_batch_size x data-parallel size. "
        "Accumulation steps = global / (micro x dp)."))
    seed: int = field(default=1234, metadata=doc("Seed for init, data order and dropout."))
    eval_interval: int = field(default=100, metadata=doc("Evaluate every N iterations (0 disables)."))
    eval_iters: int = field(default=10, metadata=doc("Validation batches per evaluation."))
    log_interval: int = field(default=10, metadata=doc("Iterations per metrics line."))
    output_dir: str = field(default="", metadata=doc(
        "Run directory for metrics, logs and checkpoints; empty means runs/<config name>. "
        "A relative path is resolved once, against the directory the run is launched from, "
        "and stored absolute (config.yaml, checkpoints)."))
    resume: str = field(default="auto", metadata=doc(
        "auto: continue from the newest complete checkpoint in the run directory if any; "
        "none: start fresh; or a path: a checkpoint directory, a checkpoint root, or a run "
        "directory (its newest complete checkpoint; a relative path is resolved against the "
        "launch directory and stored absolute). 'none' and a path start a new lineage: "
        "this run's checkpoints newer than the starting point are moved to "
        "checkpoints/abandoned/ (kept, never resumed), and later 'auto' runs continue the "
        "new lineage."))
    nonfinite: Literal["stop", "skip"] = field(default="stop", metadata=doc(
        "A NaN/Inf loss or gradient norm: stop (exit 3 naming the first bad iteration; checked "
        "at each log interval and before every save, so no checkpoint holds non-finite "
        "weights) or skip (the optimizer step is skipped and counted; checked every step, "
        "which costs one host synchronization per step)."))
    loss_spike_ratio: float = field(default=2.0, metadata=doc(
        "Log a loss spike when a step's loss exceeds this multiple of the median of the "
        "previous 50 steps' losses (0 disables). Spikes are logged and counted, not acted on."))
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=doc(
        "auto picks cuda when available."))
    keep_freed_memory: bool = field(default=True, metadata=doc(
        "On CPU, have glibc malloc keep freed memory for reuse instead of returning it to "
        "the kernel, so each step does not page-fault its activations in again "
        "(pretrain/host.py; 4-8% faster on bench-cpu, at the cost of a resident set that "
        "does not shrink and may grow by heap fragmentation: off where host memory is tight)."))
    name: str = field(default="", metadata=doc("Run name (wandb, output dir); empty = config file stem."))

    def validate(self) -> None:
        for k in ("iterations", "micro_batch_size", "log_interval", "eval_iters"):
            if getattr(self, k) <= 0:
                raise bad(f"training.{k}", getattr(self, k), "a positive integer")
        if self.global_batch_size < 0:
            raise bad("training.global_batch_size", self.global_batch_size, "0 (auto) or a positive integer")
        if self.eval_interval < 0:
            raise bad("training.eval_interval", self.eval_interval, "an integer >= 0")
        if self.iterations > MAX_ITERATIONS:
            raise bad("training.iterations", self.iterations,
                      f"at most {MAX_ITERATIONS:.0e} (at one step per second that is over "
                      "30 years of training)")
        if self.loss_spike_ratio != 0 and self.loss_spike_ratio <= 1:
            raise bad("training.loss_spike_ratio", self.loss_spike_ratio, "0 (off) or a number > 1")


@dataclass
class CheckpointConfig:
    """Distributed checkpoints under ``<output_dir>/checkpoints``."""
    interval: int = field(default=500, metadata=doc("Save every N iterations (0: only at the end)."))
    keep_last: int = field(default=3, metadata=doc("Complete checkpoints kept; older ones are deleted."))
    async_save: bool = field(default=False, metadata=doc("Overlap the write with training."))
    save_final: bool = field(default=True, metadata=doc("Save after the last iteration."))
    dir: str = field(default="", metadata=doc(
        "Checkpoint root; empty means <output_dir>/checkpoints (relative: resolved against the "
        "launch directory and stored absolute)."))
    load: str = field(default="", metadata=doc(
        "Initialize model weights from this checkpoint (e.g. converted from Hugging Face) when "
        "not resuming; optimizer and data position start fresh. Its identity (a hash of its "
        "manifest) is recorded in every checkpoint of the run: an automatic resume of a run "
        "started from another checkpoint is refused with one line (training.resume=none starts "
        "from this one). Relative: resolved against the launch directory, stored absolute."))
    allow_tokenizer_change: bool = field(default=False, metadata=doc(
        "Resume or load a checkpoint whose recorded tokenizer fingerprint differs from this "
        "run's tokenizer (deliberate vocabulary surgery). Off: such a checkpoint is refused "
        "with one line naming both fingerprints."))

    def validate(self) -> None:
        if self.interval < 0:
            raise bad("checkpoint.interval", self.interval, "an integer >= 0")
        if self.keep_last < 1:
            raise bad("checkpoint.keep_last", self.keep_last, "an integer >= 1")


@dataclass
class LoggingConfig:
    """Metrics sinks. The JSONL file and console lines are always written."""
    wandb: bool = field(default=True, metadata=doc("Log to Weights & Biases."))
    wandb_project: str = field(default="polytron", metadata=doc("wandb project."))
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = field(default="auto", metadata=doc(
        "auto: online when WANDB_API_KEY is set, otherwise offline (never prompts)."))
    tensorboard: bool = field(default=False, metadata=doc("Also write tensorboard event files."))
    progress_bar: bool = field(default=True, metadata=doc("Progress bar with ETA when stdout is a terminal."))
    peak_tflops: float = field(default=0.0, metadata=doc(
        "Per-process peak TFLOP/s for MFU; 0 picks a default: H100 bf16 989 / fp32 67 on GPU, "
        "0.15 per thread on CPU (the CI machine's measured fp32 matmul peak)."))

    def validate(self) -> None:
        if self.peak_tflops < 0:
            raise bad("logging.peak_tflops", self.peak_tflops, "a number >= 0")


@dataclass
class PrecisionConfig:
    """Numerics of the forward/backward pass. Master weights and optimizer state stay fp32."""
    dtype: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata=doc(
        "Compute dtype via autocast; auto is bf16 on GPU and fp32 on CPU."))
    fp8: FP8Config = field(default_factory=FP8Config, metadata=doc(
        "FP8 projections (torchao or Transformer Engine; docs/fp8.md). The rest of the model "
        "computes in ``dtype``."))

    def validate(self) -> None:
        self.fp8.validate()


@dataclass
class RunConfig:
    """A whole pre-training run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def validate(self) -> None:
        """Each section's ranges, then rules spanning sections."""
        for name in ("model", "parallel", "data", "optimizer", "schedule", "training",
                     "checkpoint", "logging", "precision", "evaluation"):
            getattr(self, name).validate()
        self.precision.fp8.check_run(self.model, self.training.device)
        refusal = cp_refusal(self.precision.fp8, self.parallel.context, self.data.seq_len)
        if refusal:
            raise ConfigError(refusal)
        if self.data.seq_len > self.model.max_seq_len:
            raise bad("data.seq_len", self.data.seq_len,
                      f"at most model.max_seq_len={self.model.max_seq_len}")

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def config_from_dict(data: dict) -> RunConfig:
    """Typed, validated RunConfig from a plain mapping."""
    cfg = from_dict(RunConfig, data)
    cfg.validate()
    return cfg


def _absolute(path: str, base: str) -> str:
    """``path`` with ``~`` expanded, made absolute against ``base`` (empty stays empty)."""
    if not path:
        return path
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def resolve_paths(cfg: RunConfig, base: str) -> RunConfig:
    """Make every path of the run config absolute against ``base`` (the launch directory),
    once, so the saved config means the same files whoever reads it later, from wherever.

    Paths: data.paths, data.tokenizer, data.cache_dir, training.output_dir, training.resume
    (unless auto/none), checkpoint.dir, checkpoint.load. Every rank of a run resolves in the
    same directory (torchrun and srun start them all in the launch directory; the trainer
    checks that the ranks agree)."""
    d, t, c = cfg.data, cfg.training, cfg.checkpoint
    d.paths = [_absolute(p, base) for p in d.paths]
    d.tokenizer, d.cache_dir = _absolute(d.tokenizer, base), _absolute(d.cache_dir, base)
    t.output_dir = _absolute(t.output_dir, base)
    if t.resume not in ("auto", "none"):
        t.resume = _absolute(t.resume, base)
    c.dir, c.load = _absolute(c.dir, base), _absolute(c.load, base)
    resolve_evaluation_paths(cfg.evaluation, base)
    return cfg


def load_config(path: str | None, overrides: Sequence[str] = (), base: str | None = None) -> RunConfig:
    """Load ``path`` (YAML) and apply ``section.key=value`` overrides; validated. Relative
    paths are resolved against ``base`` (default: the current directory, where the user
    launched from; see :func:`resolve_paths`)."""
    data = load_yaml(path) if path else {}
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
    cfg = config_from_dict(data)
    if not cfg.training.name:
        cfg.training.name = os.path.splitext(os.path.basename(path))[0] if path else "run"
    if not cfg.training.output_dir:
        cfg.training.output_dir = os.path.join("runs", cfg.training.name)
    return resolve_paths(cfg, base if base is not None else os.getcwd())


__all__ = ["RunConfig", "ConfigError", "load_config", "config_from_dict", "resolve_paths"]
