"""The pre-training loop.

``Trainer(cfg, rank, world_size, local_rank, backend).run()`` runs one job:
validate the layout against the world size, create the process group and mesh,
build data, model engine and optimizer, resume if a checkpoint exists, then step
until ``training.iterations``, logging, evaluating and checkpointing on their
intervals. SIGTERM / SIGUSR1 make every
rank finish its step, save, and return :data:`EXIT_REQUEUE`.
"""
from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from polytron.data import build_data
from polytron.pretrain.errors import RunError  # noqa: F401  (raised here; the launcher catches it)
from polytron.parallel.engine import build_engine
from polytron.parallel.runtime import pick_device, pick_dtype
from polytron.parallel.mesh import ParallelDims
from polytron.model.accounting import describe_kv_cache
from polytron.model.config import weight_meaning_change
from polytron.model.transformer import param_shapes
from polytron.pretrain import checkpoint as ckpt
from polytron.pretrain.checkpoint.discovery import describe_incomplete
from polytron.pretrain.config import RunConfig, check_run_length
from polytron.model.configlib import bad
from polytron.pretrain.faults import fault_point
from polytron.pretrain.guards import SPIKE_WINDOW, NumericsGuard
from polytron.pretrain.host import setup_host
from polytron.pretrain.metrics import MetricsLogger, format_line, peak_flops, peak_memory_bytes, perplexity
from polytron.pretrain.optim import build_optimizer, lr_at
from polytron.pretrain.step import TrainStep, host_sync
from polytron.pretrain.runlock import RunLock, RunLockError

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This rank's RNG states (python, numpy, torch CPU/CUDA), loadable with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _other_start(state: dict, identity: str) -> Optional[str]:
    """How a run began when not from the checkpoint of ``identity`` (its trainer state's
    ``initialized_from``); None when it began from that one."""
    recorded = state["initialized_from"]
    if not isinstance(recorded, dict):
        return "started from scratch"
    return None if recorded.get("identity") == identity else f"started from {recorded.get('path')}"


def _mtime(checkpoint: str) -> float:
    """When a complete checkpoint was finished (its manifest, written last)."""
    return os.path.getmtime(os.path.join(checkpoint, ckpt.MANIFEST))


def derived_seed(seed: int, iteration: int, rank: int) -> int:
    """Seed for a rank that resumes without its own saved RNG state (world size changed)."""
    return (seed * 1_000_003 + iteration * 7919 + rank) % 2**63


class Trainer:
    """Owns everything one training job needs; ``run()`` returns the exit status."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, local_rank: int, backend: str):
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.dims = ParallelDims.resolve(cfg.parallel, cfg.model, world_size)
        self.device = pick_device(cfg.training.device, local_rank)
        self.dtype, self.dtype_name = pick_dtype(cfg.precision.dtype, self.device)
        setup_host(self.device, cfg.training)
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend=backend, device_id=self.device if backend == "nccl" else None)
        self.mesh = self.dims.build_mesh(self.device.type) if world_size > 1 else None
        # CPU flags (signals, background saves) are agreed on a gloo group: no device wait
        self.ctrl_group = dist.new_group(backend="gloo") if world_size > 1 and backend != "gloo" else None
        self.run_dir = cfg.training.output_dir
        self.ckpt_root = cfg.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")
        self.state = TrainState()
        self.stop = StopSignal()
        self.guard = NumericsGuard(cfg.training.nonfinite, cfg.training.loss_spike_ratio)
        self.resumed_from: Optional[str] = None
        self.resume_path: Optional[str] = None
        #: the checkpoint.load target this run started from ({"path", "identity"}); None: scratch
        self.initialized_from: Optional[dict] = None
        #: set when the checkpoint to resume is already at training.iterations: run() says so
        self.nothing_to_do: Optional[str] = None
        self._locks: list[RunLock] = []
        self._pending_save: Optional[ckpt.PendingSave] = None
        try:
            self._setup()
        except BaseException:
            self.release()
            raise

    # ---------------------------------------------------------------- setup

    def _rank0_then_agree(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on rank 0; if it fails, every rank raises its one-line message."""
        error = None
        if self.rank == 0:
            try:
                fn()
            except (RunError, RunLockError, ckpt.CheckpointError) as e:
                error = str(e)
            except OSError as e:
                error = f"{e.filename or self.run_dir}: {e.strerror or e}"
        if dist.is_initialized():
            errors: list[Optional[str]] = [None] * self.world_size
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e), None)
        if error:
            raise RunError(error)

    def _check_ranks_agree(self) -> None:
        """Every rank resolved the same run config (paths included: ranks started in another
        directory would resolve relative paths elsewhere); the first differing line is named."""
        if not dist.is_initialized():
            return
        texts: list[Optional[str]] = [None] * self.world_size
        dist.all_gather_object(texts, self.cfg.to_yaml())
        for r, text in enumerate(texts):
            if text != texts[0]:
                ours, theirs = texts[0].splitlines(), text.splitlines()
                i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                line = lambda lines: lines[i].strip() if i < len(lines) else "(end)"  # noqa: E731
                raise RunError(f"rank {r} resolved another run config than rank 0 ({line(theirs)!r} vs "
                               f"{line(ours)!r}): start every rank in the same directory with the same "
                               "config and overrides")

    def _prepare_run_dir(self) -> None:
        """Rank 0: lock the run directory (and an outside checkpoint root)."""
        try:
            os.makedirs(self.run_dir, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create training.output_dir={self.run_dir}: {e.strerror or e}") from None
        dirs = [self.run_dir]
        if not os.path.abspath(self.ckpt_root).startswith(os.path.abspath(self.run_dir) + os.sep):
            dirs.append(self.ckpt_root)
        for d in dirs:
            lock = RunLock(d)
            previous = lock.acquire()
            self._locks.append(lock)
            if previous:
                print(f"took over the run lock of {d} from a process that is gone "
                      f"(pid {previous.get('pid')} on {previous.get('host')})", flush=True)

    def _write_config(self) -> None:
        """Rank 0: the resolved run config (absolute paths) as ``<output_dir>/config.yaml``."""
        try:
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
                f.write(self.cfg.to_yaml())
        except OSError as e:
            raise RunError(f"cannot write to training.output_dir={self.run_dir}: {e.strerror or e}") from None

    def release(self) -> None:
        """Drop the run-directory locks (the kernel also drops them when the process dies)."""
        for lock in self._locks:
            lock.release()
        self._locks = []

    def _dp_coords(self) -> tuple[int, int]:
        """(dp rank, dp size) of this rank: which slice of each global batch it reads."""
        if self.mesh is None:
            return 0, 1
        return self.mesh["dp"].get_local_rank(), self.dims.dp

    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        self._check_ranks_agree()
        self._rank0_then_agree(self._prepare_run_dir)
        self.resume_path = self._find_resume()
        if self._finished_already():
            return
        self._rank0_then_agree(self._write_config)
        seed_everything(t.seed)
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
        self.engine = build_engine(cfg.model, cfg.parallel, self.dims, self.mesh, self.device,
                                   self.dtype, t.seed, fp8_cfg=cfg.precision.fp8)
        self.optimizer = build_optimizer(self.engine.model_parts, cfg.optimizer)
        self.step = TrainStep(self.engine, self.optimizer, cfg.optimizer, cfg.schedule, t.iterations,
                              t.nonfinite)
        self.flops_per_token = cfg.model.flops_per_token(cfg.data.seq_len)
        self.peak = peak_flops(cfg.logging, self.device, self.dtype_name)
        self._maybe_resume()
        self.log = MetricsLogger(cfg, self.run_dir, self.rank == 0, t.iterations, self.state.iteration)
        n_params = cfg.model.num_params()
        self.log.print(f"polytron | {self.dims.describe()} | device {self.device} {self.dtype_name} | "
                       f"params {n_params / 1e6:.1f}M | global batch {self.global_batch} "
                       f"(micro {mb} x dp {dp_size} x accum {self.accum}) x seq {cfg.data.seq_len}")
        if self.engine.fp8 is not None:
            self.log.print(self.engine.fp8.describe())
        ignored = cfg.precision.fp8.ignored_keys()
        if ignored:
            self.log.print(f"note: precision.fp8.enabled is false: {', '.join(ignored)} "
                           f"{'has' if len(ignored) == 1 else 'have'} no effect in this run")
        self.log.print(describe_kv_cache(cfg.model, self.dtype))

    def _print0(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def _find_resume(self) -> Optional[str]:
        """The checkpoint this run continues from: training.resume auto (the newest complete
        one of this lineage), a path, or none."""
        resume = self.cfg.training.resume
        for line in describe_incomplete(ckpt.scan(self.ckpt_root)):
            self._print0(f"warning: {line}")
        if resume == "auto":
            return ckpt.latest_checkpoint(self.ckpt_root)
        return None if resume == "none" else ckpt.resolve_checkpoint(resume)

    def _finished_already(self) -> bool:
        """The checkpoint to resume is at or past training.iterations: nothing to train and
        nothing to write (its complete checkpoint is never saved over)."""
        if self.resume_path is None:
            return False
        it = ckpt.read_trainer_state(self.resume_path).get("iteration")
        total = self.cfg.training.iterations
        if not isinstance(it, int) or it < total:
            return False
        self.nothing_to_do = (f"nothing to do: checkpoint {self.resume_path} is at iteration {it} >= "
                              f"training.iterations={total} (raise training.iterations to train on)")
        return True

    def _maybe_resume(self) -> None:
        """training.resume (auto: newest complete checkpoint of this lineage), else
        checkpoint.load (weights only).

        Any layout loads any checkpoint: DCP reshards by parameter name. The model's full
        tensor names and shapes are checked first, and every model setting that changes
        what the weights mean must equal the checkpoint's; the first mismatch is named.
        ``none`` and an explicit path start a new lineage (see pretrain.checkpoint.discovery).
        """
        cfg = self.cfg
        resume, path = cfg.training.resume, self.resume_path
        shapes = param_shapes(cfg.model)
        if path is not None:
            self._check_same_model(path)
            self._check_same_tokenizer(path)
            if resume == "auto":
                self._check_load_not_shadowed(path)
            st = ckpt.load(path, self.engine.model_parts, self.optimizer, expected_shapes=shapes)
            self.initialized_from = st.get("initialized_from")
            self._restore_state(path, st)
            self._restore_fp8(path, st.get("world_size", 0))
            self.resumed_from = path
            self._print0(f"resumed from checkpoint {path} at iteration {self.state.iteration}"
                         f" (saved with {st.get('layout', '?')})")
        elif cfg.checkpoint.load:
            load = ckpt.resolve_checkpoint(cfg.checkpoint.load)
            self._check_same_model(load)
            self._check_same_tokenizer(load)
            ckpt.load(load, self.engine.model_parts, optimizer=None, expected_shapes=shapes)
            self.initialized_from = {"path": load, "identity": ckpt.identity(load)}
            self._restore_fp8(None, 0)
            self._print0(f"initialized model weights from {load}")
        if resume != "auto":
            self._rank0_then_agree(lambda: self._start_lineage(path))

    def _start_lineage(self, origin: Optional[str]) -> None:
        """Rank 0: set aside this root's checkpoints newer than the starting point."""
        moved = ckpt.start_lineage(self.ckpt_root, origin)
        if moved:
            where = os.path.dirname(moved[0])
            start = f"checkpoint {origin}" if origin else "scratch (training.resume=none)"
            print(f"new lineage from {start}: {len(moved)} newer checkpoint(s) of the abandoned "
                  f"lineage moved to {where} (kept, never resumed): "
                  + ", ".join(os.path.basename(m) for m in moved), flush=True)

    def _check_same_model(self, path: str) -> None:
        """Refuse a checkpoint saved with a model setting that changes what its weights mean."""
        saved = (ckpt.read_trainer_state(path).get("config") or {}).get("model")
        if not isinstance(saved, dict):
            return
        change = weight_meaning_change(saved, self.cfg.to_dict()["model"])
        if change:
            key, old, new = change
            raise ckpt.CheckpointError(
                f"checkpoint {path} was trained with {key}={old!r}, this run has {key}={new!r}: its "
                f"weights would mean something else; set {key}={old!r} (or convert the checkpoint)")

    def _check_same_tokenizer(self, path: str) -> None:
        """Refuse a checkpoint trained with another tokenizer (its recorded fingerprint; older
        checkpoints without one pass) unless checkpoint.allow_tokenizer_change."""
        saved = ckpt.read_trainer_state(path).get("tokenizer_fingerprint")
        tok = self.data.tokenizer
        if not saved or saved == tok.fingerprint:
            return
        text = (f"checkpoint {path} was trained with tokenizer {saved}, this run's tokenizer "
                f"{tok.path} is {tok.fingerprint}")
        if not self.cfg.checkpoint.allow_tokenizer_change:
            raise ckpt.CheckpointError(f"{text}: its embeddings would be read with another "
                                       "vocabulary; use the checkpoint's tokenizer and data, or set "
                                       "checkpoint.allow_tokenizer_change=true for a deliberate change")
        self._print0(f"warning: {text} (checkpoint.allow_tokenizer_change=true)")

    def _check_load_not_shadowed(self, path: str) -> None:
        """An automatic resume with checkpoint.load set: the run must have started from that
        very checkpoint (same identity), else the load would be silently ignored, e.g. a
        conversion tool rewrote the load target under an earlier run's directory."""
        load = self.cfg.checkpoint.load
        if not load:
            return
        try:
            target = ckpt.resolve_checkpoint(load)
            ident = ckpt.identity(target)
        except ckpt.CheckpointError:
            return          # the load target is gone: resuming is the only way on
        st = ckpt.read_trainer_state(path)
        began = _other_start(st, ident) if "initialized_from" in st else \
            ("saved before that checkpoint was written" if _mtime(target) > _mtime(path) else None)
        if began is None:   # same start; or an older checkpoint (no record) older than the target
            return
        raise ckpt.CheckpointError(
            f"checkpoint.load={target} is not the checkpoint this run started from: "
            f"training.resume=auto would resume {path} (iteration {st.get('iteration', '?')}, "
            f"{began}) instead of loading it; set training.resume=none to start from "
            f"checkpoint.load (this run's checkpoints are kept under checkpoints/abandoned/), "
            f"or give another training.output_dir")

    def _restore_state(self, path: str, st: dict) -> None:
        try:
            self.state = TrainState(st["iteration"], st["consumed_samples"], st["consumed_tokens"],
                                    st.get("extra", {}))
            self.data.train.load_state_dict(st["data"])
        except (KeyError, TypeError, ValueError) as e:
            raise ckpt.CheckpointError(f"checkpoint file {os.path.join(path, ckpt.STATE_FILE)}: "
                                       f"bad trainer state ({type(e).__name__}: {e})") from None
        self._restore_rng(path, st.get("world_size", 0))

    def _restore_rng(self, path: str, saved_world_size: int) -> None:
        """Same world size: each rank restores its own RNG file. Otherwise every rank
        reseeds with :func:`derived_seed` (seed, iteration, rank) — deterministic, documented."""
        name = f"rng_rank{self.rank}.pt"
        state = ckpt.load_rank_file(path, name) if saved_world_size == self.world_size else None
        if state is None:
            seed_everything(derived_seed(self.cfg.training.seed, self.state.iteration, self.rank))
            return
        try:
            set_rng_state(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"checkpoint file {os.path.join(path, name)}: bad RNG state "
                                       f"({type(e).__name__})") from None

    def _restore_fp8(self, path: Optional[str], saved_world_size: int) -> None:
        """FP8 scaling state after a load: the rank's saved file (TE delayed scaling; same
        world size, like the RNG), then scales derived from the loaded weights refreshed."""
        fp8 = self.engine.fp8
        if fp8 is None:
            return
        name = f"fp8_rank{self.rank}.pt"
        state = ckpt.load_rank_file(path, name) if path and saved_world_size == self.world_size else None
        if state:
            fp8.load_state_dict(state)
        fp8.after_load()

    def _fp8_files(self) -> dict:
        """This rank's FP8 scaling state as a per-rank checkpoint file (none when stateless)."""
        state = self.engine.fp8.state_dict() if self.engine.fp8 is not None else {}
        return {f"fp8_rank{self.rank}.pt": state} if state else {}

    # ---------------------------------------------------------------- loop

    def run(self) -> int:
        t = self.cfg.training
        if self.nothing_to_do:
            self._print0(self.nothing_to_do)
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
                stop, saved = self._control_flags()
                if saved:
                    self._finish_pending_save()
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
            self._finish_pending_save()
            return 0
        finally:
            self.log.close()
            self.release()

    def _control_flags(self) -> tuple[bool, bool]:
        """(a rank got SIGTERM/SIGUSR1, every rank's background save is written): one small
        all-reduce of CPU integers per step, on a gloo group, so the device never waits."""
        pending = self._pending_save
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
            self._print0(f"skipped iteration {self.state.iteration + 1}: non-finite loss or gradient "
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

    def _save(self, background: bool = False) -> None:
        """Checkpoint the state after ``self.state.iteration`` steps (collective).

        The steps since the last check are judged first, so no checkpoint holds weights
        of a non-finite step (policy stop). ``background`` with ``checkpoint.async_save``
        lets the write overlap training; otherwise it is finished (verified, renamed,
        ``latest`` moved) before returning. At most one save is in flight. The LR is a
        pure function of the iteration; it is stored with the schedule for inspection.
        There is no gradient scaler (bf16/fp32). Retention never deletes the checkpoint
        this run resumed from.
        """
        self._check_numerics()
        self._finish_pending_save()
        st, cfg = self.state, self.cfg
        trainer_state = {"format_version": ckpt.FORMAT_VERSION, "iteration": st.iteration,
                         "consumed_samples": st.consumed_samples, "consumed_tokens": st.consumed_tokens,
                         "lr": lr_at(st.iteration, cfg.training.iterations, cfg.optimizer, cfg.schedule),
                         "schedule": cfg.to_dict()["schedule"], "extra": st.extra,
                         "data": self.data.train.state_dict(), "world_size": self.world_size,
                         "layout": self.dims.describe(), "config": cfg.to_dict(),
                         "tokenizer_fingerprint": self.data.tokenizer.fingerprint,
                         "initialized_from": self.initialized_from}
        use_async = background and cfg.checkpoint.async_save
        start = time.perf_counter()
        protect = (self.resumed_from,) if self.resumed_from else ()
        pending = ckpt.save(self.ckpt_root, st.iteration, self.engine.model_parts, self.optimizer,
                            trainer_state, cfg.checkpoint.keep_last,
                            rank_files={f"rng_rank{self.rank}.pt": rng_state(), **self._fp8_files()},
                            async_save=use_async,
                            protect=protect)
        if use_async:
            self._pending_save = pending
            self.log.print(f"checkpoint at iteration {st.iteration}: writing in the background "
                           f"(training stalled {time.perf_counter() - start:.2f} s)")
        else:
            path = pending.finalize()
            self.log.print(f"saved checkpoint {path} in {time.perf_counter() - start:.2f} s")

    def _finish_pending_save(self) -> None:
        """Wait for the background save (if any), then verify, rename and move ``latest``."""
        if self._pending_save is None:
            return
        pending, self._pending_save = self._pending_save, None
        start = time.perf_counter()
        path = pending.finalize()
        self.log.print(f"saved checkpoint {path} (background; finalize waited "
                       f"{time.perf_counter() - start:.2f} s)")
