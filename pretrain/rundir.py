"""The run directory's lifecycle: lock, resume decision, lineage, provenance checks, saves.

:class:`RunDirectory` is everything the trainer does with ``training.output_dir`` and the
checkpoint root, so that :class:`pretrain.trainer.Trainer` is the training loop:

- ``open()``: every rank resolved the same config; rank 0 locks the run directory (and an
  outside checkpoint root); the checkpoint to resume is decided (``training.resume``:
  ``auto`` = the newest complete one of this lineage, a path, or ``none``);
- ``finished_already()``: that checkpoint is already at ``training.iterations``;
- ``check_resume`` / ``check_load``: a checkpoint must hold this model (every setting that
  changes what the weights mean), this tokenizer, and, when resuming with
  ``checkpoint.load`` set, must descend from that load target (provenance);
- ``start_lineage()``: ``none`` and an explicit path set aside this root's newer checkpoints;
- ``save`` / ``finish_pending_save``: checkpoints (background ones finished later) with
  retention that never deletes the checkpoint this run resumed from;
- ``release()``: drop the locks.

Errors are one line: rank 0 fails, every rank raises the same :class:`RunError`.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional, cast

import torch.distributed as dist

from polytron.model.config import weight_meaning_change
from polytron.pretrain import checkpoint as ckpt
from polytron.pretrain.checkpoint.discovery import describe_incomplete
from polytron.pretrain.config import RunConfig
from polytron.pretrain.errors import RunError
from polytron.pretrain.runlock import RunLock, RunLockError


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


class RunDirectory:
    """``training.output_dir`` and its checkpoints for one job (see the module docstring)."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.path = cfg.training.output_dir
        self.ckpt_root = cfg.checkpoint.dir or os.path.join(self.path, "checkpoints")
        #: the checkpoint this run continues from (decided by open()); None: none
        self.resume_path: Optional[str] = None
        #: set once that checkpoint is loaded; retention never deletes it
        self.resumed_from: Optional[str] = None
        #: the checkpoint.load target this run started from ({"path", "identity"}); None: scratch
        self.initialized_from: Optional[dict] = None
        #: console output (rank 0); the trainer points it at its metrics logger
        self.say: Callable[[str], None] = self.print0
        self._locks: list[RunLock] = []
        self._pending_save: Optional[ckpt.PendingSave] = None

    def print0(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    # ---------------------------------------------------------------- opening

    def open(self) -> None:
        """Agree on the config, lock the directory, decide the checkpoint to resume."""
        self._check_ranks_agree()
        self.rank0_then_agree(self._lock)
        self.resume_path = self._find_resume()

    def rank0_then_agree(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on rank 0; if it fails, every rank raises its one-line message."""
        error = None
        if self.rank == 0:
            try:
                fn()
            except (RunError, RunLockError, ckpt.CheckpointError) as e:
                error = str(e)
            except OSError as e:
                error = f"{e.filename or self.path}: {e.strerror or e}"
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
        gathered: list[Optional[str]] = [None] * self.world_size
        dist.all_gather_object(gathered, self.cfg.to_yaml())
        texts = cast(list[str], gathered)            # every rank sent its config text
        for r, text in enumerate(texts):
            if text != texts[0]:
                ours, theirs = texts[0].splitlines(), text.splitlines()
                i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                theirs_line, ours_line = (lines[i].strip() if i < len(lines) else "(end)" for lines in (theirs, ours))
                raise RunError(f"rank {r} resolved another run config than rank 0 ({theirs_line!r} vs "
                               f"{ours_line!r}): start every rank in the same directory with the same "
                               "config and overrides")

    def _lock(self) -> None:
        """Rank 0: lock the run directory (and an outside checkpoint root)."""
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create training.output_dir={self.path}: {e.strerror or e}") from None
        dirs = [self.path]
        if not os.path.abspath(self.ckpt_root).startswith(os.path.abspath(self.path) + os.sep):
            dirs.append(self.ckpt_root)
        for d in dirs:
            lock = RunLock(d)
            previous = lock.acquire()
            self._locks.append(lock)
            if previous:
                print(f"took over the run lock of {d} from a process that is gone "
                      f"(pid {previous.get('pid')} on {previous.get('host')})", flush=True)

    def write_config(self) -> None:
        """The resolved run config (absolute paths) as ``<output_dir>/config.yaml`` (collective)."""
        self.rank0_then_agree(self._write_config)

    def _write_config(self) -> None:
        try:
            with open(os.path.join(self.path, "config.yaml"), "w") as f:
                f.write(self.cfg.to_yaml())
        except OSError as e:
            raise RunError(f"cannot write to training.output_dir={self.path}: {e.strerror or e}") from None

    def release(self) -> None:
        """Drop the run-directory locks (the kernel also drops them when the process dies)."""
        for lock in self._locks:
            lock.release()
        self._locks = []

    # ---------------------------------------------------------------- resume decision

    def _find_resume(self) -> Optional[str]:
        """The checkpoint this run continues from: training.resume auto (the newest complete
        one of this lineage), a path, or none."""
        resume = self.cfg.training.resume
        for line in describe_incomplete(ckpt.scan(self.ckpt_root)):
            self.print0(f"warning: {line}")
        if resume == "auto":
            return ckpt.latest_checkpoint(self.ckpt_root)
        return None if resume == "none" else ckpt.resolve_checkpoint(resume)

    def finished_already(self) -> Optional[str]:
        """Why there is nothing to train (the checkpoint to resume is at or past
        training.iterations; its complete checkpoint is never saved over), else None."""
        if self.resume_path is None:
            return None
        it = ckpt.read_trainer_state(self.resume_path).get("iteration")
        total = self.cfg.training.iterations
        if not isinstance(it, int) or it < total:
            return None
        return (f"nothing to do: checkpoint {self.resume_path} is at iteration {it} >= "
                f"training.iterations={total} (raise training.iterations to train on)")

    def load_target(self) -> Optional[str]:
        """checkpoint.load resolved (weights only), when no checkpoint is resumed."""
        if self.resume_path is not None or not self.cfg.checkpoint.load:
            return None
        return ckpt.resolve_checkpoint(self.cfg.checkpoint.load)

    def check_resume(self, path: str, tokenizer) -> None:
        """The checkpoint to resume holds this model and tokenizer and, with checkpoint.load
        set, descends from that load target."""
        self._check_same_model(path)
        self._check_same_tokenizer(path, tokenizer)
        if self.cfg.training.resume == "auto":
            self._check_load_not_shadowed(path)

    def check_load(self, path: str, tokenizer) -> None:
        """The checkpoint.load target holds this model and tokenizer."""
        self._check_same_model(path)
        self._check_same_tokenizer(path, tokenizer)

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

    def _check_same_tokenizer(self, path: str, tok) -> None:
        """Refuse a checkpoint trained with another tokenizer (its recorded fingerprint; older
        checkpoints without one pass) unless checkpoint.allow_tokenizer_change."""
        saved = ckpt.read_trainer_state(path).get("tokenizer_fingerprint")
        if not saved or saved == tok.fingerprint:
            return
        text = (f"checkpoint {path} was trained with tokenizer {saved}, this run's tokenizer "
                f"{tok.path} is {tok.fingerprint}")
        if not self.cfg.checkpoint.allow_tokenizer_change:
            raise ckpt.CheckpointError(f"{text}: its embeddings would be read with another "
                                       "vocabulary; use the checkpoint's tokenizer and data, or set "
                                       "checkpoint.allow_tokenizer_change=true for a deliberate change")
        self.print0(f"warning: {text} (checkpoint.allow_tokenizer_change=true)")

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

    def resumed(self, path: str, saved_state: dict) -> None:
        """Record that checkpoint ``path`` (trainer state ``saved_state``) was loaded."""
        self.resumed_from = path
        self.initialized_from = saved_state.get("initialized_from")

    def loaded(self, path: str) -> None:
        """Record that the weights of checkpoint.load target ``path`` were loaded."""
        self.initialized_from = {"path": path, "identity": ckpt.identity(path)}

    def start_lineage(self) -> None:
        """Unless resuming automatically: set aside this root's checkpoints newer than the
        starting point (collective; ``none`` and an explicit path start a new lineage)."""
        if self.cfg.training.resume != "auto":
            self.rank0_then_agree(lambda: self._start_lineage(self.resume_path))

    def _start_lineage(self, origin: Optional[str]) -> None:
        moved = ckpt.start_lineage(self.ckpt_root, origin)
        if moved:
            where = os.path.dirname(moved[0])
            start = f"checkpoint {origin}" if origin else "scratch (training.resume=none)"
            print(f"new lineage from {start}: {len(moved)} newer checkpoint(s) of the abandoned "
                  f"lineage moved to {where} (kept, never resumed): "
                  + ", ".join(os.path.basename(m) for m in moved), flush=True)

    # ---------------------------------------------------------------- saves

    def save(self, iteration: int, model_parts, optimizer, trainer_state: dict,
             rank_files: dict[str, Any], background: bool = False) -> None:
        """Checkpoint ``iteration`` (collective) after finishing any save still in flight.

        ``background`` with ``checkpoint.async_save`` lets the write overlap training;
        otherwise it is finished (verified, renamed, ``latest`` moved) before returning.
        Retention (``checkpoint.keep_last``) never deletes the checkpoint resumed from."""
        self.finish_pending_save()
        cfg = self.cfg.checkpoint
        use_async = background and cfg.async_save
        start = time.perf_counter()
        protect = (self.resumed_from,) if self.resumed_from else ()
        pending = ckpt.save(self.ckpt_root, iteration, model_parts, optimizer, trainer_state,
                            cfg.keep_last, rank_files=rank_files, async_save=use_async, protect=protect)
        if use_async:
            self._pending_save = pending
            self.say(f"checkpoint at iteration {iteration}: writing in the background "
                     f"(training stalled {time.perf_counter() - start:.2f} s)")
        else:
            path = pending.finalize()
            self.say(f"saved checkpoint {path} in {time.perf_counter() - start:.2f} s")

    @property
    def pending_save(self) -> Optional[ckpt.PendingSave]:
        """The background save in flight, if any."""
        return self._pending_save

    def finish_pending_save(self) -> None:
        """Wait for the background save (if any), then verify, rename and move ``latest``."""
        if self._pending_save is None:
            return
        pending, self._pending_save = self._pending_save, None
        start = time.perf_counter()
        path = pending.finalize()
        self.say(f"saved checkpoint {path} (background; finalize waited "
                 f"{time.perf_counter() - start:.2f} s)")
