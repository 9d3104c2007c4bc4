"""The pre-training loop.

``Trainer(cfg, rank, world_size, local_rank, backend).run()`` runs one job:
validate the layout against the world size, create the process group and mesh,
open the run directory (:class:`pretrain.rundir.RunDirectory`: lock, resume decision,
lineage, provenance checks, saves), build data, model engine and optimizer, resume if a
checkpoint exists, then step until ``training.iterations``, logging, evaluating and
checkpointing on their intervals. Per-rank state that features checkpoint (RNG, FP8
scaling, ...) is a registry (:mod:`pretrain.checkpoint.rank_state`); the learning rate and
weight decay come from the run's schedule (:mod:`pretrain.schedule`). SIGTERM / SIGUSR1
make every rank finish its step, save, and return :data:`EXIT_REQUEUE`.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from polytron.data import build_data
from polytron.model.accounting import describe_kv_cache
from polytron.model.configlib import bad
from polytron.model.transformer import param_shapes
from polytron.parallel.engine import build_engine
from polytron.parallel.loss import PerSourceLoss, TokenLoss
from polytron.parallel.mesh import ParallelDims
from polytron.parallel.runtime import pick_device, pick_dtype
from polytron.pretrain import checkpoint as ckpt
from polytron.pretrain.checkpoint.rank_state import RankStates, RngState, seed_everything
from polytron.pretrain.config import RunConfig, check_run_length
from polytron.pretrain.errors import RunError  # noqa: F401  (raised here; the launcher catches it)
from polytron.pretrain.faults import fault_point
from polytron.pretrain.guards import SPIKE_WINDOW, NumericsGuard
from polytron.pretrain.host import setup_host
from polytron.pretrain.metrics import MetricsLogger, format_line, peak_flops, peak_memory_bytes, perplexity
from polytron.pretrain.optim import build_optimizer
from polytron.pretrain.rundir import RunDirectory
from polytron.pretrain.step import TrainStep, host_sync

#: Exit status after a signal-triggered save: "state saved, please requeue" (sysexits EX_TEMPFAIL).
EXIT_REQUEUE = 75


@dataclass
class TrainState:
    """Counters saved with every checkpoint."""
    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    extra: dict = field(default_factory=dict)


class StopSignal:
    """Records SIGTERM / SIGUSR1; the loop checks it once per step on every rank."""

    def __init__(self):
        self.received: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum


class Trainer:
    """Owns everything one training job needs; ``run()`` returns the exit status."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, local_rank: int, backend: str):
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.dims = ParallelDims.resolve(cfg.parallel, cfg.model, world_size, cfg.data.seq_len)
        self.device = pick_device(cfg.training.device, local_rank)
        self.dtype, self.dtype_name = pick_dtype(cfg.precision.dtype, self.device)
        setup_host(self.device, cfg.training)
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend=backend, device_id=self.device if backend == "nccl" else None)
        self.mesh = self.dims.build_mesh(self.device.type) if world_size > 1 else None
        # CPU flags (signals, background saves) are agreed on a gloo group: no device wait
        self.ctrl_group = dist.new_group(backend="gloo") if world_size > 1 and backend != "gloo" else None
        self.run_dir = RunDirectory(cfg, rank, world_size)
        self.state = TrainState()
        self.stop = StopSignal()
        self.guard = NumericsGuard(cfg.training.nonfinite, cfg.training.loss_spike_ratio)
        self.rank_states = RankStates(rank)
        #: set when the checkpoint to resume is already at training.iterations: run() says so
        self.nothing_to_do: Optional[str] = None
        try:
            self._setup()
        except BaseException:
            self.release()
            raise

    # ---------------------------------------------------------------- setup

    def release(self) -> None:
        """Drop the run-directory locks."""
        self.run_dir.release()

    def _dp_coords(self) -> tuple[int, int]:
        """(dp rank, dp size) of this rank: which slice of each global batch it reads."""
        if self.mesh is None:
            return 0, 1
        return self.mesh["dp"].get_local_rank(), self.dims.dp

    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        self.run_dir.open()
        self.nothing_to_do = self.run_dir.finished_already()
        if self.nothing_to_do:
            return
        self.run_dir.write_config()
        seed_everything(t.seed)
        self._build_data()
        self.engine = build_engine(cfg.model, cfg.parallel, self.dims, self.mesh, self.device,
                                   self.dtype, t.seed, fp8_cfg=cfg.precision.fp8, loss=self._loss())
        self.optimizer = build_optimizer(self.engine.model_parts, cfg.optimizer)
        self.step = TrainStep(self.engine, self.optimizer, cfg.optimizer, cfg.schedule, t.iterations,
                              t.nonfinite)
        self.rank_states.register("rng", RngState(t.seed, self.rank))
        for name, state in self.engine.rank_states.items():
            self.rank_states.register(name, state)
        self.flops_per_token = cfg.model.flops_per_token(cfg.data.seq_len)
        self.peak = peak_flops(cfg.logging, self.device, self.dtype_name)
        self._maybe_resume()
        self.log = MetricsLogger(cfg, self.run_dir.path, self.rank == 0, t.iterations, self.state.iteration)
        self.run_dir.say = self.log.print
        self.downstream = self._downstream_evaluator()
        self._describe()

    def _build_data(self) -> None:
        """This rank's data: the global batch split into micro-batches over the dp ranks."""
        cfg, t = self.cfg, self.cfg.training
        dp_rank, dp_size = self._dp_coords()
        mb = t.micro_batch_size
        self.global_batch = t.global_batch_size or mb * dp_size
        if self.global_batch % (mb * dp_size):
            raise bad("training.global_batch_size", self.global_batch,
                      f"a multiple of micro_batch_size x data-parallel size = {mb * dp_size}")
        check_run_length(t.iterations, self.global_batch, cfg.data.seq_len)
        self.accum = self.global_batch // (mb * dp_size)
        self.data = build_data(cfg.data, model_vocab_size=cfg.model.vocab_size, seed=t.seed,
                               global_batch_size=self.global_batch, micro_batch_size=mb,
                               dp_rank=dp_rank, dp_size=dp_size, train_iterations=t.iterations,
                               eval_iterations=t.eval_iters, eval_interval=t.eval_interval)

    def _downstream_evaluator(self):
        """The in-loop task evaluator of ``evaluation.tasks`` (None without tasks); the harness
        is imported only here."""
        if not self.cfg.evaluation.tasks:
            return None
        from polytron.pretrain.evaluation import InLoopEvaluator
        dp_rank, dp_size = self._dp_coords()
        return InLoopEvaluator(self.cfg.evaluation, self.engine, self.dims, self.mesh, self.data.tokenizer,
                               self.cfg.data.seq_len, self.cfg.training.micro_batch_size, dp_rank, dp_size)

    def _loss(self) -> TokenLoss:
        """The training loss: per-source statistics when the data tags sources."""
        return PerSourceLoss() if self.cfg.data.per_source_loss else TokenLoss()

    def _describe(self) -> None:
        """The run's start-up lines: layout, model size, batch, FP8, KV cache."""
        cfg = self.cfg
        mb, (_, dp_size) = cfg.training.micro_batch_size, self._dp_coords()
        self.log.print(f"polytron | {self.dims.describe()} | device {self.device} {self.dtype_name} | "
                       f"params {cfg.model.num_params() / 1e6:.1f}M | global batch {self.global_batch} "
                       f"(micro {mb} x dp {dp_size} x accum {self.accum}) x seq {cfg.data.seq_len}")
        if self.engine.fp8 is not None:
            self.log.print(self.engine.fp8.describe())
        ignored = cfg.precision.fp8.ignored_keys()
        if ignored:
            self.log.print(f"note: precision.fp8.enabled is false: {', '.join(ignored)} "
                           f"{'has' if len(ignored) == 1 else 'have'} no effect in this run")
        self.log.print(describe_kv_cache(cfg.model, self.dtype))

    def _maybe_resume(self) -> None:
        """training.resume (auto: newest complete checkpoint of this lineage), else
        checkpoint.load (weights only).

        Any layout loads any checkpoint: DCP reshards by parameter name. The model's full
        tensor names and shapes are checked first, and every model setting that changes
        what the weights mean must equal the checkpoint's; the first mismatch is named.
        ``none`` and an explicit path start a new lineage (see pretrain.checkpoint.discovery).
        """
        shapes = param_shapes(self.cfg.model)
        path, load = self.run_dir.resume_path, self.run_dir.load_target()
        if path is not None:
            self.run_dir.check_resume(path, self.data.tokenizer)
            st = ckpt.load(path, self.engine.model_parts, self.optimizer, expected_shapes=shapes)
            self.run_dir.resumed(path, st)
            self._restore_state(path, st)
            self.rank_states.restore(path, st.get("world_size", 0) == self.world_size, self.state.iteration)
            self.run_dir.print0(f"resumed from checkpoint {path} at iteration {self.state.iteration}"
                                f" (saved with {st.get('layout', '?')})")
        elif load is not None:
            self.run_dir.check_load(load, self.data.tokenizer)
            ckpt.load(load, self.engine.model_parts, optimizer=None, expected_shapes=shapes)
            self.run_dir.loaded(load)
            self.rank_states.restore(None, False, None)
            self.run_dir.print0(f"initialized model weights from {load}")
        self.run_dir.start_lineage()

    def _restore_state(self, path: str, st: dict) -> None:
        """The counters and the data position of a resumed checkpoint."""
        try:
            self.state = TrainState(st["iteration"], st["consumed_samples"], st["consumed_tokens"],
                                    st.get("extra", {}))
            self.data.train.load_state_dict(st["data"])
        except (KeyError, TypeError, ValueError) as e:
            raise ckpt.CheckpointError(f"checkpoint file {os.path.join(path, ckpt.STATE_FILE)}: "
                                       f"bad trainer state ({type(e).__name__}: {e})") from None

    # ---------------------------------------------------------------- loop

    def run(self) -> int:
        t = self.cfg.training
        if self.nothing_to_do:
            self.run_dir.print0(self.nothing_to_do)
            self.release()
            return 0
        interval_start, interval_tokens = time.perf_counter(), 0
        step_times: list[float] = []
        try:
            while self.state.iteration < t.iterations:
                step_start = time.perf_counter()
                result = self._train_step()
                step_times.append(time.perf_counter() - step_start)
                interval_tokens += self.global_batch * self.cfg.data.seq_len
                self.log.step()
                it = self.state.iteration
                if it % t.log_interval == 0 or it == t.iterations:
                    self._check_numerics()
                    elapsed = time.perf_counter() - interval_start
                    self._log_interval(result, interval_tokens / elapsed, step_times)
                    interval_start, interval_tokens, step_times = time.perf_counter(), 0, []
                if t.eval_interval and (it % t.eval_interval == 0 or it == t.iterations):
                    self._evaluate()
                if self.downstream is not None and self.cfg.evaluation.due(it, t.iterations):
                    self._evaluate_downstream()
                stop, saved = self._control_flags()
                if saved:
                    self.run_dir.finish_pending_save()
                if stop:
                    self._save()
                    self.log.print(f"signal {self.stop.received or 'on another rank'}: saved at iteration "
                                   f"{it}, exiting with status {EXIT_REQUEUE} for requeue")
                    return EXIT_REQUEUE
                if self.cfg.checkpoint.interval and it % self.cfg.checkpoint.interval == 0 \
                        and it < t.iterations:
                    self._save(background=True)
            if self.cfg.checkpoint.save_final:
                self._save()
            self.run_dir.finish_pending_save()
            return 0
        finally:
            self.log.close()
            self.release()

    def _control_flags(self) -> tuple[bool, bool]:
        """(a rank got SIGTERM/SIGUSR1, every rank's background save is written): one small
        all-reduce of CPU integers per step, on a gloo group, so the device never waits."""
        pending = self.run_dir.pending_save
        not_done = pending is not None and not pending.local_done()
        flags = torch.tensor([1 if self.stop.received else 0, 1 if not_done else 0], dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.ctrl_group)
        with host_sync("control flags (CPU tensor)"):
            stop, any_not_done = flags.tolist()
        return bool(stop), pending is not None and not any_not_done

    def _train_step(self):
        microbatches = self.data.train.next_step()
        result = self.step(microbatches, self.state.iteration)
        if result.skipped:
            self.state.extra["skipped_steps"] = self.state.extra.get("skipped_steps", 0) + 1
            self.run_dir.print0(f"skipped iteration {self.state.iteration + 1}: non-finite loss or gradient "
                         f"norm (training.nonfinite=skip)")
        fault_point("step")
        self.state.iteration += 1
        self.state.consumed_samples += self.global_batch
        self.state.consumed_tokens += self.global_batch * self.cfg.data.seq_len
        self.guard.record(self.state.iteration, result.loss, result.grad_norm)
        return result

    def _check_numerics(self) -> None:
        """Judge the steps since the last check: stop on a non-finite one (policy stop),
        log loss spikes."""
        with host_sync("numerics check at a log interval or before a save"):
            spikes = self.guard.check()
        for it, loss, median in spikes:
            self.log.log({"iteration": it, "loss_spike": loss, "spike_reference": median},
                         f"loss spike at iteration {it}: {loss:.4f} vs median {median:.4f} of the "
                         f"previous {SPIKE_WINDOW} steps")

    def _log_interval(self, result, tok_s: float, step_times: list[float]) -> None:
        with host_sync("log line"):
            loss, grad_norm = float(result.loss), float(result.grad_norm)
            stats = self.engine.reduce_stats()
        rec = {"iteration": self.state.iteration, "total_iterations": self.cfg.training.iterations,
               "consumed_tokens": self.state.consumed_tokens, "loss": loss, "lr": result.lr,
               "grad_norm": grad_norm, "tokens_per_s": tok_s,
               "mfu": tok_s * self.flops_per_token / (self.peak * self.world_size),
               "step_time_s": sum(step_times) / len(step_times),
               "peak_memory_bytes": peak_memory_bytes(self.device),
               "skipped_steps": self.state.extra.get("skipped_steps", 0), **stats}
        self.log.log(rec, format_line(rec))

    def _evaluate(self) -> None:
        batches = list(self.data.valid_batches(self.cfg.training.eval_iters))
        if not batches:
            return
        with host_sync("evaluation"):
            loss = float(self.engine.eval_loss(batches))
        rec = {"iteration": self.state.iteration, "eval_loss": loss, "eval_ppl": perplexity(loss)}
        self.log.log(rec, f"eval at iter {self.state.iteration} | loss {loss:.4f} | ppl {perplexity(loss):.2f}")

    def _evaluate_downstream(self) -> None:
        """The in-loop tasks under this layout (collective); a failing task is one line."""
        with host_sync("downstream evaluation"):
            rec, line = self.downstream.run(self.state.iteration, self.log.print)
        self.log.log(rec, line)

    def _save(self, background: bool = False) -> None:
        """Checkpoint the state after ``self.state.iteration`` steps (collective).

        The steps since the last check are judged first, so no checkpoint holds weights
        of a non-finite step (policy stop). ``background`` with ``checkpoint.async_save``
        lets the write overlap training (:meth:`RunDirectory.save`). The LR is a pure
        function of the iteration; it is stored with the schedule for inspection. There
        is no gradient scaler (bf16/fp32).
        """
        self._check_numerics()
        st, cfg = self.state, self.cfg
        trainer_state = {"format_version": ckpt.FORMAT_VERSION, "iteration": st.iteration,
                         "consumed_samples": st.consumed_samples, "consumed_tokens": st.consumed_tokens,
                         "lr": self.step.schedule.lr(st.iteration),
                         "schedule": cfg.to_dict()["schedule"], "extra": st.extra,
                         "data": self.data.train.state_dict(), "world_size": self.world_size,
                         "layout": self.dims.describe(), "config": cfg.to_dict(),
                         "tokenizer_fingerprint": self.data.tokenizer.fingerprint,
                         "initialized_from": self.run_dir.initialized_from}
        self.run_dir.save(st.iteration, self.engine.model_parts, self.optimizer, trainer_state,
                          self.rank_states.files(), background)
