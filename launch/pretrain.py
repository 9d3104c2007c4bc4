#!/usr/bin/env python
"""Pre-training entry point.

    torchrun --nproc_per_node=N launch/pretrain.py --config launch/configs/tiny.yaml [section.key=value ...]
    srun python launch/pretrain.py --config ...          # ranks from SLURM's environment
    python launch/pretrain.py --config ...               # one process

Exit status: 0 done; 2 bad input (config, layout, data, checkpoint, environment, a run
directory in use or unwritable), printed as one ``error:`` line; 3 a non-finite loss or
gradient norm under ``training.nonfinite=stop``; 1 an I/O failure outside a checkpoint
save (e.g. a full disk while logging) or a lost peer (another rank or node died, one
``error: lost contact ...`` line); 75 saved after SIGTERM/SIGUSR1, requeue me.
``python -m launch.run`` takes torchrun's options and passes SIGTERM/SIGUSR1 on to
the workers and their exit status back (docs/launch.md).
"""
from __future__ import annotations

import argparse
import os
import sys

from polytron.model.errors import Failure, PolytronError
from polytron.tools.cli import command


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="polytron pre-training",
                                epilog="Trailing section.key=value arguments override the YAML config.")
    p.add_argument("--config", help="YAML run config (launch/configs/*.yaml)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--help-config", action="store_true", help="list every config key with its documentation")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p.parse_args(argv)


def help_config() -> None:
    from polytron.model.configlib import field_docs
    from polytron.pretrain.config import RunConfig
    for key, text, default in field_docs(RunConfig):
        print(f"{key} = {default!r}\n    {text}")


_HAD_PROCESS_GROUP = False


def close_process_group() -> None:
    """Destroy the default process group if this process made one (after the error line)."""
    global _HAD_PROCESS_GROUP
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        _HAD_PROCESS_GROUP = True
        dist.destroy_process_group()


def exit_now(status: int) -> None:
    """Exit with ``status``. After a multi-process run the interpreter's own teardown is
    skipped (``os._exit``, once every stream is flushed and the metrics, wandb and process
    group are closed): gloo's worker threads may still hold finished work objects then, and
    destroying them during interpreter finalization aborts the process ("terminate called
    without an active exception", SIGABRT) after a run that succeeded."""
    if not _HAD_PROCESS_GROUP:
        sys.exit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@command(interrupted="interrupted", cleanup=close_process_group)
def run(argv: list[str]) -> int:
    """Train; every error is one ``error:`` line and its exit status (``polytron.tools.cli.command``)."""
    from polytron.launch.env import follow_launcher
    follow_launcher()   # under torchrun: SIGTERM (save, exit 75) if the agent dies, never an orphan
    import warnings
    # megatron-core's package import warns about optional GPU kernels we never use.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    import torch.distributed as dist

    from polytron.launch.env import check_master_reachable, choose_backend, detect_launch_env, export_env, lost_peer
    from polytron.model.configlib import ConfigError
    from polytron.parallel.mesh import ParallelDims
    from polytron.pretrain.config import load_config

    args = parse_args(argv)
    if args.help_config:
        help_config()
        return 0
    try:
        if not args.config:
            raise ConfigError("--config is required (for example --config launch/configs/tiny.yaml)")
        cfg = load_config(args.config, args.overrides)
        env = detect_launch_env()
        ParallelDims.resolve(cfg.parallel, cfg.model, env.world_size)   # before any process group
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        backend = choose_backend(cfg.parallel.backend)
        export_env(env)
        if env.world_size > 1:
            check_master_reachable(env)
        if env.rank == 0:
            print("resolved config:\n" + cfg.to_yaml(), flush=True)
        from polytron.pretrain.trainer import Trainer
        trainer = Trainer(cfg, env.rank, env.world_size, env.local_rank, backend)
        return trainer.run()
    except PolytronError:      # one line and its status: 2 bad input, 3 numerics (NumericsError)
        raise
    except RuntimeError as e:  # a collective failed because another rank or node is gone
        lost = lost_peer(e) if dist.is_available() and dist.is_initialized() else None
        if lost is None:
            raise
        raise Failure(lost) from None


if __name__ == "__main__":
    exit_now(run(sys.argv[1:]))
