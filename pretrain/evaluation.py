"""Downstream evaluation inside the training job (``evaluation.tasks``).

Every ``evaluation.interval`` iterations the trainer runs a small set of lm-evaluation-harness
tasks read from local files (no network: ``HF_DATASETS_OFFLINE``) under the run's own layout.
The harness builds the requests on every rank; their log-likelihoods are scored through the
engine's evaluation forward (:meth:`parallel.engine.TrainEngine.eval_loss`), so TP / PP / CP /
EP / FSDP ranks cooperate exactly as in validation and no rank gathers the full model. The
data-parallel ranks score disjoint slices of the requests (rank-parallel), and one all-reduce
gives every rank all of them. Multiple choice (ranked classification: ``acc``, ``acc_norm``)
and perplexity tasks (``loglikelihood_rolling``: ``bits_per_byte``, ...) are supported; a task
that generates text is refused in one line (run it with ``tools/evaluate.py``).

A task that fails (a broken task file, a missing data file) is reported in one line and
skipped, and so is a generation task, before it runs; training continues. The harness
(``pip install -e '.[eval]'``) is imported only when ``evaluation.tasks`` is set. See
docs/evaluation.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from polytron.model.configlib import ConfigError, bad, doc


@dataclass
class EvaluationConfig:
    """In-loop downstream evaluation with lm-evaluation-harness tasks read from local files."""
    tasks: list[str] = field(default_factory=list, metadata=doc(
        "Tasks to run: a task name defined in ``include_path``, or a path to a task YAML file or "
        "to a directory of them (every task it defines). Empty disables in-loop evaluation."))
    include_path: list[str] = field(default_factory=list, metadata=doc(
        "Directories of local task YAML files searched for task names (the harness's built-in "
        "tasks are not indexed: they download their data)."))
    interval: int = field(default=1000, metadata=doc(
        "Run the tasks every N iterations and after the last one (0: only after the last)."))
    limit: int = field(default=0, metadata=doc(
        "At most this many documents per task (0: all); a small-compute set keeps it small."))
    num_fewshot: int = field(default=-1, metadata=doc(
        "Few-shot examples per prompt; -1 keeps each task file's own setting."))
    seed: int = field(default=1234, metadata=doc(
        "Seed of the tasks' few-shot sampling (the training RNG is not touched)."))

    def validate(self) -> None:
        for k in ("interval", "limit"):
            if getattr(self, k) < 0:
                raise bad(f"evaluation.{k}", getattr(self, k), "an integer >= 0")
        if self.num_fewshot < -1:
            raise bad("evaluation.num_fewshot", self.num_fewshot, "-1 (the task's own) or an integer >= 0")
        for k in ("tasks", "include_path"):
            for entry in getattr(self, k):
                if not isinstance(entry, str) or not entry:
                    raise bad(f"evaluation.{k}", entry, "non-empty strings")

    def due(self, iteration: int, last: int) -> bool:
        """Whether the tasks run after ``iteration`` (of ``last``)."""
        if not self.tasks:
            return False
        return iteration == last or (self.interval > 0 and iteration % self.interval == 0)


def resolve_evaluation_paths(cfg: EvaluationConfig, base: str) -> None:
    """Task files, task directories and include paths made absolute against ``base`` (a bare
    task name stays as it is)."""
    def absolute(p: str) -> str:
        return os.path.normpath(os.path.join(base, os.path.expanduser(p)))
    cfg.include_path = [absolute(p) for p in cfg.include_path]
    cfg.tasks = [absolute(t) if _is_path(t) else t for t in cfg.tasks]


def _is_path(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml")) or os.sep in entry or entry.startswith(("~", "."))


class TaskError(ValueError):
    """A task that cannot be loaded (no such task or file, a broken task file); one line."""


def harness_installed() -> None:
    """Import the harness, or one ConfigError line saying how to install it."""
    try:
        import lm_eval.evaluator  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"evaluation.tasks needs lm-evaluation-harness ({e}): pip install -e '.[eval]'") from None


def split_tasks(entries: list[str], include: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(task names, task YAML files, include directories): a directory entry adds itself to
    the include path and runs every task it defines."""
    names, files, dirs = [], [], list(include)
    for entry in entries:
        if os.path.isdir(entry):
            dirs.append(entry)
        elif entry.endswith((".yaml", ".yml")) or os.sep in entry:
            if not os.path.isfile(entry):
                raise TaskError(f"task file {entry}: no such file")
            files.append(entry)
        else:
            names.append(entry)
    for d in dirs:
        if not os.path.isdir(d):
            raise TaskError(f"task directory {d}: no such directory")
    return names, files, dirs


def load_tasks(entries: list[str], include: list[str], builtin: bool = True) -> dict:
    """The harness's task dict for ``entries`` (names, YAML files, directories); ``builtin``
    allows the harness's own tasks, which are indexed (about 14 CPU seconds, and they
    download) only when the local files and include paths do not load the entries by
    themselves. TaskError in one line."""
    names, files, dirs = split_tasks(entries, include)
    if builtin:
        try:
            return _load_tasks(entries, names, files, dirs, builtin=False)
        except TaskError:
            pass       # a built-in name, or a local file that refers to one: index them too
    return _load_tasks(entries, names, files, dirs, builtin=builtin)


def _load_tasks(entries: list[str], names: list[str], files: list[str], dirs: list[str], builtin: bool) -> dict:
    from lm_eval.tasks import TaskManager
    names = list(names)
    try:
        manager = TaskManager(include_path=dirs or None, include_defaults=builtin)
        for d in dirs:
            if d in entries:
                names += [t for t in manager.all_tasks if _defined_in(manager, t, d)]
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise TaskError(f"task {unknown[0]!r}: not found (no task of that name in the include paths)")
        return manager.load_task_or_group(names + [os.path.abspath(f) for f in files])
    except TaskError:
        raise
    except Exception as e:  # the harness raises many kinds for a broken task file
        text = str(e).splitlines()[0] if str(e) else ""
        raise TaskError(f"task {', '.join(entries)}: does not load ({type(e).__name__}: {text})") from None


def _defined_in(manager: Any, task: str, directory: str) -> bool:
    """Whether ``task`` comes from a YAML file under ``directory`` (a task, not a group or tag)."""
    entry = manager.task_index.get(task)
    path = getattr(entry, "yaml_path", None)
    return getattr(getattr(entry, "kind", None), "name", "") in ("TASK", "PY_TASK") and path is not None \
        and os.path.abspath(str(path)).startswith(os.path.abspath(directory) + os.sep)


#: Metrics of the harness logged per task (those a task reports).
LOGGED_METRICS = ("acc", "acc_norm", "bits_per_byte", "byte_perplexity", "word_perplexity")


class InLoopEvaluator:
    """Runs ``evaluation.tasks`` through the training engine (see the module docstring).

    Every rank builds the same requests (the harness runs as one process on each rank) and
    scores its part through :class:`pretrain.lm_eval_model.EngineScorer`; every rank ends
    with the same numbers, rank 0 logs them.
    """

    def __init__(self, cfg: EvaluationConfig, engine, dims, mesh, tokenizer, seq_len: int,
                 micro_batch: int, dp_rank: int, dp_size: int):
        harness_installed()
        for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):     # local task files only
            os.environ.setdefault(key, "1")
        import logging

        import torch.distributed as dist

        from polytron.pretrain.lm_eval_model import EngineScorer, PolytronLM
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        self.cfg = cfg
        tp_rank = mesh["tp"].get_local_rank() if mesh is not None and dims.tp > 1 else 0
        reduce: Optional[Callable] = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            def reduce(totals) -> None:
                on_device = totals.to(engine.device)
                dist.all_reduce(on_device)
                totals.copy_(on_device.cpu())
        scorer = EngineScorer(engine, seq_len, micro_batch, dp_rank, dp_size, pad_id=tokenizer.eod_id,
                              microbatches=max(1, dims.pp), contributes=engine.is_last_stage and tp_rank == 0,
                              all_reduce=reduce)
        self.lm = PolytronLM(scorer, tokenizer, show_progress=False)
        self.tasks: Optional[dict[str, Any]] = None
        self.failed: dict[str, str] = {}

    def _load(self, say: Callable[[str], None]) -> dict[str, Any]:
        """Each entry's tasks, loaded once; an entry that fails is reported once and dropped."""
        if self.tasks is None:
            self.tasks = {}
            for entry in self.cfg.tasks:
                try:
                    self.tasks.update(load_tasks([entry], self.cfg.include_path, builtin=False))
                except TaskError as e:
                    say(f"evaluation: skipped: {e}")
            for name in [n for n, t in self.tasks.items() if getattr(t, "OUTPUT_TYPE", "") == "generate_until"]:
                del self.tasks[name]
                say(f"evaluation: skipped: task {name} generates text; in-loop evaluation scores "
                    "log-likelihoods only (run it with tools/evaluate.py)")
            for task in self.tasks.values():
                if self.cfg.num_fewshot >= 0:
                    task.set_config(key="num_fewshot", value=self.cfg.num_fewshot)
                task.set_fewshot_seed(seed=self.cfg.seed)       # the task's sampler only: no global RNG
        return self.tasks

    def run(self, iteration: int, say: Callable[[str], None]) -> tuple[dict, str]:
        """(metrics record, console line) after ``iteration``; failures are said in one line each."""
        import contextlib
        import io
        import time

        from lm_eval.evaluator import evaluate
        start = time.perf_counter()
        rec: dict[str, Any] = {"iteration": iteration}
        parts = []
        for name, task in self._load(say).items():
            if name in self.failed:
                continue
            try:
                with contextlib.redirect_stderr(io.StringIO()):     # the harness's per-task bars
                    out = evaluate(lm=self.lm, task_dict={name: task}, limit=self.cfg.limit or None,
                                   bootstrap_iters=0, verbosity="ERROR")
            except Exception as e:  # a task's own failure must not stop the run
                self.failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                say(f"evaluation: task {name} failed at iteration {iteration} ({self.failed[name]}); "
                    "skipped from now on, training continues")
                continue
            got = {m: v for key, v in out["results"].get(name, {}).items()
                   for m in [key.split(",")[0]] if m in LOGGED_METRICS and isinstance(v, (int, float))}
            rec.update({f"downstream/{name}/{m}": float(v) for m, v in got.items()})
            parts.append(f"{name} " + " ".join(f"{m} {v:.4f}" for m, v in sorted(got.items())))
        rec["downstream_time_s"] = time.perf_counter() - start
        line = " | ".join([f"downstream at iter {iteration}", *parts, f"{rec['downstream_time_s']:.2f} s"])
        return rec, line
