"""Sharded, atomic, verified checkpoints through torch.distributed.checkpoint (DCP).

Layout under the checkpoint root (``<output_dir>/checkpoints``)::

    iter_0000100/              one complete checkpoint
        .metadata, __R_0.distcp  DCP shards: ``model.*``, ``optimizer.*`` (flattened, by
                                 fully-qualified parameter name) and ``extras.*``; any
                                 TP / PP / FSDP / DP layout can load them
        rng_rank<R>.pt           RNG states of rank R (tensors and plain values only)
        trainer_state.json       iteration, consumed samples/tokens, LR and schedule,
                                 data-loader position, run config, layout, the
                                 tokenizer's fingerprint, the checkpoint the run
                                 was initialized from (path + identity)
        manifest.json            every file above with its size and CRC32
    latest                     text file: name of the newest complete checkpoint
    lineage.json               after a rollback to a checkpoint outside this root
    abandoned/                 checkpoints set aside by a rollback, never resumed

The package is split by job:

* :mod:`.common`: names, :class:`CheckpointError`, rank helpers;
* :mod:`.safe_read`: reading files without executing code (allow-listed unpickler,
  ``weights_only`` loads, errors naming the shard file);
* :mod:`.manifest`: size + CRC32 manifest and DCP-index checks;
* :mod:`.discovery`: what is complete, which checkpoint to resume, retention, rollback;
* :mod:`.state`: state dicts and loading into any layout;
* :mod:`.save`: the save protocol (sync and async);
* :mod:`.offline`: whole-tensor I/O in one process for the conversion tools.

It never builds a model: callers pass the full model's tensor shapes when they want
them checked.
"""
from polytron.pretrain.checkpoint.common import (
    FORMAT_VERSION,
    MANIFEST,
    POINTER,
    STATE_FILE,
    CheckpointError,
    ckpt_iteration,
    ckpt_name,
)
from polytron.pretrain.checkpoint.discovery import (
    is_complete,
    latest_checkpoint,
    resolve_checkpoint,
    scan,
    start_lineage,
)
from polytron.pretrain.checkpoint.manifest import build_manifest, identity, verify_files
from polytron.pretrain.checkpoint.offline import load_tensors, save_tensors
from polytron.pretrain.checkpoint.safe_read import load_rank_file, read_metadata, read_trainer_state, tensor_shapes
from polytron.pretrain.checkpoint.save import PendingSave, save
from polytron.pretrain.checkpoint.state import check_model_shapes, load

__all__ = ["FORMAT_VERSION", "MANIFEST", "POINTER", "STATE_FILE", "CheckpointError", "ckpt_iteration",
           "ckpt_name", "is_complete", "latest_checkpoint", "resolve_checkpoint", "scan", "start_lineage",
           "build_manifest", "identity", "verify_files", "load_tensors", "save_tensors", "load_rank_file",
           "read_metadata", "read_trainer_state", "tensor_shapes", "PendingSave", "save",
           "check_model_shapes", "load"]
