#!/usr/bin/env python
"""Convert checkpoints between polytron (DCP) and Hugging Face model directories.

Each architecture's spec carries its Hugging Face adapter (``model/<arch>/hf.py``: config
writer, tensor name map, reshaping); this tool does the file work around it (safetensors,
tokenizer, staging, refusals) and dispatches on ``model.arch`` (to-hf) or on
``config.json``'s ``model_type`` (from-hf).

    python tools/convert_checkpoint.py to-hf   SRC DST [--tokenizer PATH] [--dtype bf16] [--max-shard-size 5GB]
                                               [--overwrite] [--packed [CLASS]] [--plugin MODULE ...]
    python tools/convert_checkpoint.py from-hf SRC DST [--overwrite]
    python tools/convert_checkpoint.py from-megatron SRC DST [--overwrite]
    python tools/convert_checkpoint.py to-megatron   SRC DST [--overwrite] [--plugin MODULE ...]
    python tools/convert_checkpoint.py from-yoco-released SRC DST [--params FILE] [--rope-pairing P]
                                                       [--seq-len N] [--overwrite]

``from-megatron`` / ``to-megatron``: Megatron-LM / megatron-core GPT checkpoints (torch_dist
or legacy ``mp_rank_*`` files in; torch_dist out), see tools/megatron_ckpt.py and
docs/checkpoints.md ("Megatron-LM checkpoints").

``from-yoco-released``: a checkpoint of the released YOCO code (``microsoft/unilm`` ``YOCO/``:
``params.json`` + ``checkpoint.pth``, or safetensors) -> our ``model.arch=yoco`` checkpoint +
``config.yaml`` (names and refusals: model/yoco/released.py; docs/checkpoints.md). Pickles are
read with ``torch.load(weights_only=True)`` only.

``to-hf``: SRC is a checkpoint directory (``.../iter_0000300``), a checkpoint root or a
run's output directory (its newest complete checkpoint). DST becomes a Hugging Face
model directory: safetensors (sharded with ``model.safetensors.index.json`` above
``--max-shard-size``), ``config.json``, ``generation_config.json`` and the tokenizer
(a SentencePiece model is converted to ``tokenizer.json`` and checked to encode like
SentencePiece; a Hugging Face tokenizer directory is copied). ``--packed`` asks the
architecture's adapter for its packed variant (BitNet: 2-bit ternary weights for
transformers' ``autobitlinear`` (default) or ``bitlinear`` class, see model/bitnet/hf.py);
integer tensors keep their dtype under ``--dtype``.

``from-hf``: SRC is a local Llama-family Hugging Face directory (``config.json`` +
safetensors). DST receives ``checkpoint/`` (a weights-only polytron checkpoint) and
``config.yaml``, a run config that continues pre-training from it with the model's own
tokenizer once ``data.paths`` is set::

    python launch/pretrain.py --config DST/config.yaml data.paths=[PREFIX]

DST must be new or empty; a non-empty DST is refused unless ``--overwrite`` is given,
which removes what an earlier conversion left there (every ``*.safetensors``, the
safetensors/``pytorch_model`` index, ``pytorch_model*.bin``, and the files the command
writes: configs and tokenizer for ``to-hf``, ``checkpoint/`` and ``config.yaml`` for
``from-hf``) and keeps anything else. An earlier ``DST/run`` (training continued from
the previous conversion, which ``training.resume=auto`` would resume instead of the new
checkpoint) is renamed to ``DST/run.superseded-<time>``. The converted checkpoint records
the fingerprint of its run config's tokenizer, so resuming or loading it checks the
tokenizer. Both commands write into ``DST.tmp-<pid>`` beside
DST and move the result in only once it is complete, so an interrupted conversion
leaves DST as it was, never old and new weights side by side.

What is trusted (docs/checkpoints.md, "What the tools trust and verify"): ``model.plugins``
a checkpoint lists are imported only when named with ``--plugin``; transformers never
runs a directory's custom code (``trust_remote_code=False``, no prompt); a relative
``data.tokenizer`` stored in a checkpoint is looked up under its run directory; a recorded
``tokenizer_fingerprint`` must match (an explicit ``--tokenizer`` that differs is used with
a note); a DST that is a source is refused by file identity. ``from-hf`` keeps a distinct
``lm_head.weight`` untied even under ``tie_word_embeddings: true``, as transformers does.

Exit status 0; 2 with one ``error:`` line naming the file, field or tensor; 1 with one
``error:`` line when writing fails (e.g. a full disk).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from fnmatch import fnmatch
from typing import Any, Iterator, Optional, Sequence

import torch

from polytron.model.errors import WriteFailed
from polytron.model.hf import ConvertError, find_adapter, read_hf_config
from polytron.model.provenance import UntrustedCode, add_plugin_option, trusted_model_config
from polytron.tools.cli import command

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                      "chat_template.jinja", "chat_template.json")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Weight files of a model directory; --overwrite removes all of them before the new ones land.
WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                   "pytorch_model.bin.index.json")
#: What each command writes besides weights (replaced as a whole with --overwrite).
TO_HF_OUTPUTS = ("config.json", "generation_config.json", *HF_TOKENIZER_FILES)
FROM_HF_OUTPUTS = ("checkpoint", "config.yaml")
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
#: Sample text the converted tokenizer must encode exactly like SentencePiece.
TOKENIZER_PROBE = ("The quick brown fox jumps over 13 lazy dogs.\n\n  Indented line\twith tab; "
                   "trailing spaces   \nünïcödé, 中文, emoji 🎉, symbols <>&{}[]#@~")


# ====================================================================== configs

def hf_config_to_model(hf: dict, file: str):
    """Our ModelConfig for a Hugging Face ``config.json`` (the adapter of its model_type)."""
    return find_adapter(hf.get("model_type"), file).from_hf_config(hf, file)


# ====================================================================== safetensors

def parse_size(text: str) -> int:
    """'5GB', '500MB', '1024' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B?)\s*", text, re.I)
    if not m:
        raise ConvertError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB or a byte count")
    unit = m.group(2).upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit])


def write_safetensors(tensors: dict[str, torch.Tensor], dst: str, max_shard_bytes: int) -> list[str]:
    """``model.safetensors``, or numbered shards plus ``model.safetensors.index.json``."""
    from safetensors.torch import save_file
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(dst, "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, os.path.join(dst, fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def written_seq_len(seq_len: int, max_seq_len: int) -> int:
    """``--seq-len`` of a conversion: data.seq_len of the written config (0: min(2048,
    max_seq_len)); outside 1..max_seq_len is one ConvertError line, before anything is written."""
    if seq_len == 0:
        return min(2048, max_seq_len)
    if not 0 < seq_len <= max_seq_len:
        raise ConvertError(f"--seq-len {seq_len}: must be between 1 and the model's max_seq_len "
                           f"({max_seq_len}), or 0 for min(2048, max_seq_len)")
    return seq_len


def load_data_pickle(file: str, allowed: Sequence = (), hint: str = "") -> Any:
    """A ``torch.save`` file unpickled as data only: ``torch.load(weights_only=True)`` with
    nothing beyond tensors, dtypes and containers but the ``allowed`` classes. A pickle that
    asks for any other global is refused and its payload never runs; ConvertError in one
    line (``hint`` appended to the refusal)."""
    import pickle
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).splitlines() or [type(e).__name__]
        why = next((line.strip() for line in lines if "GLOBAL" in line or "global" in line), lines[0])
        raise ConvertError(f"{file}: refused, not loadable as data only (torch.load weights_only=True: "
                           f"{why[:160]}){hint}") from None
    except (OSError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{file}: unreadable ({text[:160]})") from None


def read_safetensors(src: str) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory (single file or sharded with an index)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise ConvertError(f"{index}: not a safetensors index ({e})") from None
    elif os.path.isfile(os.path.join(src, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        bins = [n for n in os.listdir(src) if n.endswith(".bin")]
        hint = " (pickled .bin weights are not read: convert them to safetensors)" if bins else ""
        raise ConvertError(f"{src}: no model.safetensors or model.safetensors.index.json{hint}")
    out: dict[str, torch.Tensor] = {}
    for name in files:
        file = os.path.join(src, name)
        try:
            out.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConvertError(f"{file}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    return out


# ====================================================================== tokenizer

def resolve_tokenizer(run_cfg: dict, override: Optional[str], ckpt_path: Optional[str] = None) -> Optional[str]:
    """The tokenizer a run trained with: --tokenizer, data.tokenizer, or the built-in corpus's.

    A path stored in a checkpoint is never resolved against this tool's working directory:
    a relative one is looked up under the run directory of ``ckpt_path`` (see
    :func:`stored_path`)."""
    if override:
        return override
    data = run_cfg.get("data") if isinstance(run_cfg, dict) else None
    data = data if isinstance(data, dict) else {}
    if data.get("tokenizer"):
        return stored_path(data["tokenizer"], "data.tokenizer", run_cfg, ckpt_path)
    if data.get("builtin_corpus"):
        from polytron.data.builtin import ensure_builtin_corpus
        cache = stored_path(data.get("cache_dir", "~/.cache/polytron"), "data.cache_dir", run_cfg, ckpt_path)
        return ensure_builtin_corpus(cache, int(data.get("tokenizer_vocab_size", 4096))).tokenizer
    return None


def run_directories(run_cfg: dict, ckpt_path: Optional[str]) -> list[str]:
    """Where a relative path stored in a checkpoint's run config may be found: the run's
    absolute ``training.output_dir`` and the directory holding the checkpoint root
    (``RUN`` of ``RUN/checkpoints/iter_N``; ``DST`` of a converted ``DST/checkpoint``)."""
    bases = []
    training = run_cfg.get("training") if isinstance(run_cfg, dict) else None
    out = training.get("output_dir") if isinstance(training, dict) else None
    if isinstance(out, str) and os.path.isabs(os.path.expanduser(out)):
        bases.append(os.path.expanduser(out))
    if ckpt_path:
        root = os.path.dirname(os.path.abspath(ckpt_path))
        bases.append(os.path.dirname(root) if os.path.basename(root) == "checkpoints" else root)
    return list(dict.fromkeys(bases))


def stored_path(value: Any, key: str, run_cfg: dict, ckpt_path: Optional[str]) -> str:
    """An absolute path for a path-valued ``key`` of a checkpoint's run config.

    Absolute (or ``~``) paths are used as stored. A relative one (written by older runs)
    is resolved against the run directory when it exists there; otherwise the tool
    refuses, since the current directory of whoever reads the checkpoint is unrelated."""
    from polytron.data.errors import DataError
    path = os.path.expanduser(str(value))
    if os.path.isabs(path):
        return path
    bases = run_directories(run_cfg, ckpt_path)
    for base in bases:
        if os.path.exists(os.path.join(base, path)):
            return os.path.join(base, path)
    where = f"checkpoint {ckpt_path}" if ckpt_path else "the checkpoint"
    looked = f" (not found under {', '.join(bases)})" if bases else ""
    raise DataError(f"{where} stores the relative path {key}={value!r}{looked}; it is not resolved against "
                    "this directory: pass --tokenizer PATH")


def checkpoint_tokenizer(state: dict, ckpt_path: Optional[str], override: Optional[str]):
    """The tokenizer to use with a checkpoint (None when the run names none), loaded without
    remote code and checked against the checkpoint's ``tokenizer_fingerprint`` when it
    records one: a mismatch is refused, or, for an explicit ``override``, noted on stderr."""
    from polytron.data.errors import DataError
    from polytron.data.tokenizer import load_tokenizer
    path = resolve_tokenizer(state.get("config", {}), override, ckpt_path)
    if not path:
        return None
    tok = load_tokenizer(path)
    recorded = state.get("tokenizer_fingerprint")
    if not isinstance(recorded, str) or not recorded or recorded == tok.fingerprint:
        return tok
    if override:
        print(f"note: --tokenizer {override} ({tok.fingerprint}) is not the tokenizer checkpoint {ckpt_path} "
              f"was trained with ({recorded}); using it as asked", file=sys.stderr)
        return tok
    raise DataError(f"tokenizer mismatch: checkpoint {ckpt_path} was trained with tokenizer {recorded}, "
                    f"{tok.path} is {tok.fingerprint}; pass --tokenizer PATH to use another one deliberately")


def write_tokenizer(tok_path: str, dst: str) -> tuple[Optional[int], Optional[int]]:
    """Write tokenizer files into ``dst``; returns (bos_id, eos_id)."""
    if os.path.isdir(tok_path):
        copied = [n for n in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(tok_path, n))]
        if not copied:
            raise ConvertError(f"tokenizer directory {tok_path} holds no Hugging Face tokenizer files")
        for n in copied:
            shutil.copy2(os.path.join(tok_path, n), os.path.join(dst, n))
    elif os.path.isfile(tok_path):
        _sentencepiece_to_hf(tok_path, dst)
    else:
        raise ConvertError(f"tokenizer {tok_path}: no such file or directory (pass --tokenizer PATH)")
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(dst, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise ConvertError(f"tokenizer written to {dst} does not load: {str(e).splitlines()[0]}") from None
    if os.path.isfile(tok_path):
        _check_same_encoding(tok_path, tok)
    return tok.bos_token_id, tok.eos_token_id


def _sentencepiece_to_hf(model_file: str, dst: str) -> None:
    """``tokenizer.model`` plus a fast ``tokenizer.json`` that segments like SentencePiece."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import normalizers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast
    proto = pb.ModelProto()  # type: ignore[attr-defined]  # protobuf builds its message classes at import
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    sp = spm.SentencePieceProcessor(model_file=model_file)
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    tmp = os.path.join(dst, ".spm_convert")
    os.makedirs(tmp, exist_ok=True)
    shutil.copy2(model_file, os.path.join(tmp, "tokenizer.model"))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer"}, f)
    backend = LlamaTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False).backend_tokenizer
    shutil.rmtree(tmp)
    # spm's own rules: dummy prefix "▁" (if set), spaces -> "▁", no pre-splitting
    seq: list[normalizers.Normalizer] = [normalizers.Replace(" ", "▁")]
    if proto.normalizer_spec.add_dummy_prefix:
        seq.insert(0, normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence(seq)
    backend.pre_tokenizer = None
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=piece(sp.bos_id()),
                                   eos_token=piece(sp.eos_id()), unk_token=piece(sp.unk_id()),
                                   pad_token=piece(sp.pad_id()))
    fast.save_pretrained(dst)
    shutil.copy2(model_file, os.path.join(dst, "tokenizer.model"))


def _check_same_encoding(model_file: str, tok) -> None:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model_file)
    want, got = sp.encode(TOKENIZER_PROBE), tok.encode(TOKENIZER_PROBE, add_special_tokens=False)
    if want != got:
        print(f"warning: the converted tokenizer encodes differently from {model_file} "
              f"(its normalizer has no exact fast equivalent); tokenizer.model is included",
              file=sys.stderr)


# ====================================================================== destination

def check_destination(dst: str, overwrite: bool, sources: list[str]) -> None:
    """Refuse a DST that is a file, is one of the sources, or is non-empty without --overwrite."""
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ConvertError(f"destination {dst} exists and is not a directory")
    for src in sources:
        if same_file(src, dst):
            raise ConvertError(f"destination {dst} is the source {src}; choose another directory")
    entries = sorted(os.listdir(dst)) if os.path.isdir(dst) else []
    if entries and not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ConvertError(f"destination {dst} is not empty ({shown}); choose a new directory, or pass "
                           f"--overwrite to replace the weights and files an earlier conversion wrote there")


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file or directory (device + inode, so symlinks, bind
    mounts and hard links count); paths that do not exist compare by their real path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def stale_entries(dst: str, outputs: tuple[str, ...]) -> list[str]:
    """Names in ``dst`` that --overwrite replaces: weight files and the command's outputs."""
    if not os.path.isdir(dst):
        return []
    return sorted(n for n in os.listdir(dst)
                  if n in outputs or any(fnmatch(n, p) for p in WEIGHT_PATTERNS))


def _weights_last(name: str) -> tuple[bool, bool, str]:
    """Move order: configs and tokenizer, then weight shards, then the index naming them."""
    return name.endswith(".index.json"), any(fnmatch(name, p) for p in WEIGHT_PATTERNS), name


def _commit(tmp: str, dst: str, outputs: tuple[str, ...]) -> None:
    """Put the finished ``tmp`` in place of DST (a rename), or, in a non-empty DST, set the
    stale entries aside, move the new ones in by rename and delete the stale ones."""
    if not os.path.isdir(dst) or not os.listdir(dst):
        if os.path.isdir(dst):
            os.rmdir(dst)
        os.replace(tmp, dst)
        return
    old = f"{dst.rstrip(os.sep)}.old-{os.getpid()}"
    os.makedirs(old)
    for name in stale_entries(dst, outputs):
        os.replace(os.path.join(dst, name), os.path.join(old, name))
    for name in sorted(os.listdir(tmp), key=_weights_last):
        os.replace(os.path.join(tmp, name), os.path.join(dst, name))
    shutil.rmtree(old)


def write_failure(dst: str, e: BaseException) -> WriteFailed:
    """One-line WriteFailed for an error raised while writing DST (OSError, safetensors'
    or torch's serialization errors, a checkpoint save that could not complete)."""
    from polytron.pretrain.checkpoint.common import first_line
    if isinstance(e, WriteFailed):
        return e
    code = getattr(e, "errno", None)
    text = first_line(e)
    if code == errno.ENOSPC or "No space left" in text or "unexpected pos" in text:
        code, text = errno.ENOSPC, "No space left on device"
    elif isinstance(e, OSError) and e.strerror:
        text = e.strerror + (f" ({e.filename})" if e.filename else "")
    parent = os.path.dirname(os.path.abspath(dst.rstrip(os.sep))) or os.sep
    try:
        st = os.statvfs(parent)
        text += f"; {st.f_bavail * st.f_frsize / (1 << 20):.1f} MiB free on its file system"
    except OSError:
        pass
    return WriteFailed(code or errno.EIO, f"cannot write {dst}: {text}; {dst} is left as it was")


@contextmanager
def staged(dst: str, outputs: tuple[str, ...]) -> Iterator[str]:
    """A fresh directory beside DST to write into; moved into DST only when the block succeeds.
    A failure to write (full disk, I/O error) becomes one :class:`WriteFailed` (an OSError)."""
    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException
    tmp = f"{dst.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        yield tmp
        _commit(tmp, dst, outputs)
    except (OSError, RuntimeError, SafetensorError, CheckpointException) as e:   # not ValueError: bad input
        shutil.rmtree(tmp, ignore_errors=True)                 # first, so the free space shown is real
        raise write_failure(dst, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def converted_state(cfg_dict: dict, origin: str) -> dict:
    """trainer_state.json of a converted weights-only checkpoint (iteration 0), with the
    fingerprint of the tokenizer its run config names when that one loads, so a later
    resume or load checks the tokenizer like any checkpoint's."""
    from polytron.pretrain import checkpoint as ckpt
    state = {"iteration": 0, "consumed_samples": 0, "consumed_tokens": 0, "extra": {},
             "format_version": ckpt.FORMAT_VERSION, "converted_from": origin, "config": cfg_dict}
    tok = (cfg_dict.get("data") or {}).get("tokenizer")
    if tok:
        from polytron.data.errors import DataError
        from polytron.data.tokenizer import fingerprint_of
        try:
            state["tokenizer_fingerprint"] = fingerprint_of(tok)
        except DataError:
            pass                       # no loadable tokenizer yet: the run names one before training
    return state


def retire_old_run(run_dir: str):
    """Set aside ``run_dir`` (training of an earlier conversion into the same DST, which
    ``training.resume=auto`` would resume instead of the new checkpoint); its new name, or
    None when there was none. A run still training there is refused (its lock)."""
    from polytron.pretrain.runlock import RunLockError, retire_run_dir
    try:
        return retire_run_dir(run_dir)
    except RunLockError as e:
        raise ConvertError(f"{e}: stop that training before replacing its checkpoint") from None


def write_converted_run(dst: str, run: Any, model_cfg: Any, tensors: dict, origin: str, *, suffix: str,
                        what: str, report_name: str, report: dict) -> None:
    """Stage and move into DST a converted model ready to train on: ``checkpoint/`` (weights
    only, iteration 0), ``config.yaml`` (``run`` with ``model_cfg``, loading that checkpoint,
    output in DST/run, training name + ``-suffix``) and the tool's JSON ``report_name``.
    ``what`` completes the config's header line ("Continued training of ORIGIN <what>").

    An earlier DST/run (training of an earlier conversion into DST) would be resumed instead
    of the new checkpoint: it is renamed to ``DST/run.superseded-<time>`` (kept), recorded as
    ``superseded_run`` in the report and named on stdout; a run still training there is
    refused (its lock)."""
    import yaml

    from polytron.model.configlib import to_dict
    from polytron.pretrain import checkpoint as ckpt
    dst_abs = os.path.abspath(dst)
    old_run = os.path.join(dst_abs, "run")
    run.model = model_cfg
    run.checkpoint.load = os.path.join(dst_abs, "checkpoint")
    run.checkpoint.dir = ""
    run.training.resume = "auto"
    run.training.name = f"{run.training.name or 'model'}-{suffix}"
    run.training.output_dir = os.path.join(dst_abs, "run")
    cfg_dict = to_dict(run)
    with staged(dst, ("checkpoint", "config.yaml", report_name)) as tmp:
        ckpt.save_tensors(os.path.join(tmp, "checkpoint"), tensors, converted_state(cfg_dict, origin))
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(f"# Continued training of {origin} {what}:\n"
                    f"#   python launch/pretrain.py --config {os.path.join(dst, 'config.yaml')}\n")
            yaml.safe_dump(cfg_dict, f, sort_keys=False)
        superseded = retire_old_run(old_run)
        if superseded:
            report["superseded_run"] = superseded
        with open(os.path.join(tmp, report_name), "w") as f:
            json.dump(report, f, indent=1)
    if superseded:
        print(f"set aside the earlier run {old_run} (it would have resumed its own checkpoints "
              f"instead of the new one): now {superseded}")


# ====================================================================== to-hf

def to_hf(src: str, dst: str, tokenizer: Optional[str] = None, dtype: Optional[str] = None,
          max_shard_size: str = "5GB", overwrite: bool = False, packed: Optional[str] = None,
          plugins: tuple[str, ...] = ()) -> str:
    """Our checkpoint (or run directory) -> Hugging Face directory; returns the checkpoint used.

    DST must be new or empty unless ``overwrite`` (see the module docstring). Only the
    ``plugins`` named here are imported, whatever the checkpoint lists (model/provenance.py).
    On a live run directory, a checkpoint removed by retention while it is read is replaced
    by the newest complete one that still exists."""
    from polytron.pretrain import checkpoint as ckpt
    from polytron.pretrain.checkpoint.discovery import read_newest
    shard_bytes = parse_size(max_shard_size)
    check_destination(dst, overwrite, [src, ckpt.resolve_checkpoint(src)])
    path, (mcfg, adapter, hf, out_dtype, tok) = read_newest(
        src, lambda p: _read_for_export(p, tokenizer, dtype, packed, plugins))
    check_destination(dst, overwrite, [src, path])
    with staged(dst, TO_HF_OUTPUTS) as tmp:
        bos, eos = write_tokenizer(tok.path, tmp) if tok else (None, None)
        if not tok:
            print("warning: the run names no tokenizer; pass --tokenizer PATH to include one", file=sys.stderr)
        write_safetensors(hf, tmp, shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(adapter.to_hf_config(mcfg, bos, eos, HF_DTYPE_NAMES[out_dtype]), f, indent=2)
        for name, text in (adapter.remote_code(mcfg) if adapter.remote_code else {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": bos, "eos_token_id": eos}, f, indent=2)
    return path


def checkpoint_model_config(path: str, plugins: tuple[str, ...]):
    """The model config stored in checkpoint ``path``'s trainer state (plugins only as the
    user allowed them: model/provenance.py); a missing or broken one is a ConvertError."""
    from polytron.model.configlib import ConfigError
    from polytron.pretrain import checkpoint as ckpt
    state = ckpt.read_trainer_state(path)
    run_cfg = state.get("config") if isinstance(state, dict) else None
    try:
        return trusted_model_config(run_cfg.get("model") if isinstance(run_cfg, dict) else None, plugins,
                                    f"checkpoint {path}")
    except UntrustedCode as e:
        raise ConvertError(str(e)) from None
    except (TypeError, ConfigError) as e:
        raise ConvertError(f"{os.path.join(path, ckpt.STATE_FILE)}: no usable model config ({e})") from None


def _read_for_export(path: str, tokenizer: Optional[str], dtype: Optional[str], packed: Optional[str],
                     plugins: tuple[str, ...]):
    """(model config, adapter, HF tensors, dtype, tokenizer) of checkpoint ``path``."""
    from polytron.model.spec import get_spec
    from polytron.pretrain import checkpoint as ckpt
    mcfg = checkpoint_model_config(path, plugins)
    state = ckpt.read_trainer_state(path)
    adapter = get_spec(mcfg.arch).hf
    if packed and adapter is not None:
        if not hasattr(adapter, "packed"):
            raise ConvertError(f"checkpoint {path}: architecture {mcfg.arch} has no packed export (--packed)")
        adapter = adapter.packed(packed)
    why = "no Hugging Face adapter" if adapter is None else adapter.exportable(mcfg)
    if why:
        raise ConvertError(f"checkpoint {path}: architecture {mcfg.arch}: {why}")
    tok = checkpoint_tokenizer(state, path, tokenizer)
    tensors = ckpt.load_tensors(path)
    out_dtype = DTYPES[dtype] if dtype else next(iter(tensors.values())).dtype
    hf = {k: v.to(out_dtype) if v.is_floating_point() else v
          for k, v in adapter.to_hf_tensors(mcfg, tensors).items()}
    return mcfg, adapter, hf, out_dtype, tok


# ====================================================================== from-hf

def from_hf(src: str, dst: str, seq_len: int = 0, overwrite: bool = False) -> str:
    """Hugging Face Llama directory -> DST/checkpoint + DST/config.yaml; returns the config path.

    DST must be new or empty unless ``overwrite`` (see the module docstring)."""
    import yaml

    from polytron.model.configlib import to_dict
    from polytron.pretrain import checkpoint as ckpt
    from polytron.pretrain.config import RunConfig
    check_destination(dst, overwrite, [src])
    hf_cfg, cfg_file = read_hf_config(src)
    adapter = find_adapter(hf_cfg.get("model_type"), cfg_file)
    mcfg = hf_config_to_model(hf_cfg, cfg_file)
    tied = mcfg.tie_embeddings
    tensors = adapter.from_hf_tensors(mcfg, read_safetensors(src), src)
    if tied and not mcfg.tie_embeddings:
        print(f"note: {cfg_file} sets tie_word_embeddings but the weights hold a distinct lm_head.weight: "
              "kept untied, as transformers loads it (model.tie_embeddings=false)", file=sys.stderr)
    run = RunConfig(model=mcfg)
    src_abs, dst_abs = os.path.abspath(src), os.path.abspath(dst)
    run.data.tokenizer = src_abs
    run.data.seq_len = written_seq_len(seq_len, mcfg.max_seq_len)
    run.checkpoint.load = os.path.join(dst_abs, "checkpoint")
    run.training.name = os.path.basename(src_abs.rstrip("/")) + "-continued"
    run.training.output_dir = os.path.join(dst_abs, "run")
    cfg_dict = to_dict(run)
    out = os.path.join(dst, "config.yaml")
    with staged(dst, FROM_HF_OUTPUTS) as tmp:
        ckpt.save_tensors(os.path.join(tmp, "checkpoint"), tensors, converted_state(cfg_dict, src_abs))
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(f"# Continued pre-training of {src_abs} (tools/convert_checkpoint.py from-hf).\n"
                    "# Set data.paths (Megatron prefixes tokenized with data.tokenizer), then:\n"
                    f"#   python launch/pretrain.py --config {out} data.paths=[PREFIX]\n")
            yaml.safe_dump(cfg_dict, f, sort_keys=False)
        superseded = retire_old_run(run.training.output_dir)
    if superseded:
        print(f"set aside the earlier run {run.training.output_dir} (it would have resumed its own "
              f"checkpoints instead of the new one): now {superseded}")
    return out


# ====================================================================== from-yoco-released

YOCO_REPORT = "yoco_conversion.json"
YOCO_WEIGHT_FILES = ("checkpoint.pth", "consolidated.00.pth", "model.pth", "model.pt")


def _released_files(src: str, params: Optional[str]) -> tuple[str, str]:
    """(weights, params.json) of a released YOCO checkpoint: SRC a directory (safetensors or
    one of :data:`YOCO_WEIGHT_FILES`, its params.json) or a weights file (params.json beside it)."""
    if os.path.isdir(src):
        names = [n for n in YOCO_WEIGHT_FILES if os.path.isfile(os.path.join(src, n))]
        safetensors = any(os.path.isfile(os.path.join(src, n))
                          for n in ("model.safetensors", "model.safetensors.index.json"))
        if not names and not safetensors:
            raise ConvertError(f"{src}: no {', '.join(YOCO_WEIGHT_FILES)} or model.safetensors "
                               f"(or pass the weights file as SRC)")
        weights = src if safetensors else os.path.join(src, names[0])
        folder = src
    elif os.path.isfile(src):
        weights, folder = src, os.path.dirname(os.path.abspath(src))
    else:
        raise ConvertError(f"{src}: no such file or directory")
    params = params or os.path.join(folder, "params.json")
    if not os.path.isfile(params):
        raise ConvertError(f"{params}: no such file (the released YOCOArgs; pass --params FILE)")
    return weights, params


def _read_released_weights(weights: str) -> dict:
    """Tensors of a safetensors directory/file, or a torch.save file read as data only."""
    if os.path.isdir(weights):
        return read_safetensors(weights)
    if weights.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(weights)
        except (SafetensorError, OSError, ValueError) as e:
            raise ConvertError(f"{weights}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    loaded = load_data_pickle(weights, hint="; save the YOCO module's state_dict() alone, or as safetensors")
    if not isinstance(loaded, dict):
        raise ConvertError(f"{weights}: holds a {type(loaded).__name__}, not a state dict")
    return loaded


def from_yoco_released(src: str, dst: str, params: Optional[str] = None, pairing: str = "interleaved",
                       seq_len: int = 0, overwrite: bool = False) -> str:
    """Released YOCO checkpoint -> DST/checkpoint + DST/config.yaml (+ report); returns the config path.

    ``pairing``: ``interleaved`` keeps the weights as saved (``model.yoco.rope_pairing:
    interleaved``); ``rotate_half`` permutes the query/key rows into our default pairing.
    Both take ``rope_frequencies: released``; the logits are the released model's."""
    from polytron.model.yoco import released
    from polytron.pretrain.config import RunConfig
    weights, params_file = _released_files(src, params)
    check_destination(dst, overwrite, [src, weights, params_file])
    try:
        with open(params_file) as f:
            args = json.load(f)
    except (OSError, ValueError) as e:
        raise ConvertError(f"{params_file}: unreadable JSON ({str(e).splitlines()[0]})") from None
    cfg = released.model_config(args, params_file, pairing)
    tensors = released.from_released(cfg, released.unwrap(_read_released_weights(weights), weights), weights)
    notes = []
    if args["n_layers"] % 2:
        notes.append(f"n_layers={args['n_layers']} is odd: the released code builds n_layers // 2 layers per "
                     f"decoder, so model.num_layers={cfg.num_layers}")
    notes.append("data.tokenizer is not set: the released models use tiktoken cl100k_base; set a tokenizer "
                 "with the same ids before training")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    run = RunConfig(model=cfg)
    run.data.seq_len = written_seq_len(seq_len, cfg.max_seq_len)
    run.training.name = os.path.basename(os.path.abspath(src).rstrip("/"))
    report = {"source": os.path.abspath(weights), "params": os.path.abspath(params_file), "tensors": len(tensors),
              "rope_pairing": pairing, "rope_frequencies": "released", "notes": notes}
    write_converted_run(dst, run, cfg, tensors, os.path.abspath(weights), suffix="continued",
                        what="(tools/convert_checkpoint.py from-yoco-released)", report_name=YOCO_REPORT,
                        report=report)
    return os.path.join(dst, "config.yaml")


# ====================================================================== CLI

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Convert polytron checkpoints to and from Hugging Face.")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-hf", help="polytron checkpoint or run directory -> Hugging Face directory")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--tokenizer", help="tokenizer to include (default: the run's data.tokenizer or "
                                       "built-in corpus tokenizer)")
    a.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: as saved)")
    a.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    a.add_argument("--overwrite", action="store_true", help="replace an earlier export in a non-empty DST")
    a.add_argument("--packed", nargs="?", const="autobitlinear", metavar="CLASS",
                   help="packed low-bit weights where the architecture has them (BitNet: the transformers "
                        "class the config selects, autobitlinear (default) or bitlinear)")
    add_plugin_option(a)
    b = sub.add_parser("from-hf", help="Hugging Face Llama directory -> polytron checkpoint + config.yaml")
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument("--seq-len", type=int, default=0, help="data.seq_len of the written config "
                                                            "(default min(2048, max_position_embeddings))")
    b.add_argument("--overwrite", action="store_true",
                   help="replace checkpoint/, config.yaml and weight files in a non-empty DST")
    c = sub.add_parser("from-megatron", help="Megatron-LM / megatron-core checkpoint (torch_dist or legacy "
                                             "mp_rank_*) -> polytron checkpoint + config.yaml")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--overwrite", action="store_true",
                   help="replace checkpoint/, config.yaml and the report in a non-empty DST")
    d = sub.add_parser("to-megatron", help="polytron checkpoint or run directory -> megatron-core torch_dist")
    d.add_argument("src")
    d.add_argument("dst")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier export in a non-empty DST")
    add_plugin_option(d)
    e = sub.add_parser("from-yoco-released", help="released YOCO checkpoint (microsoft/unilm YOCO/: params.json "
                                                  "+ checkpoint.pth or safetensors) -> polytron checkpoint + "
                                                  "config.yaml")
    e.add_argument("src", help="directory with params.json and checkpoint.pth (or safetensors), or the weights file")
    e.add_argument("dst")
    e.add_argument("--params", help="the released YOCOArgs JSON (default: params.json beside the weights)")
    e.add_argument("--rope-pairing", choices=("interleaved", "rotate_half"), default="interleaved",
                   help="interleaved: weights as saved (default); rotate_half: q/k rows permuted into our "
                        "default pairing (same logits)")
    e.add_argument("--seq-len", type=int, default=0, help="data.seq_len of the written config "
                                                            "(default min(2048, model.max_seq_len))")
    e.add_argument("--overwrite", action="store_true",
                   help="replace checkpoint/, config.yaml and the report in a non-empty DST")
    return p.parse_args(argv)


@command
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.cmd == "to-hf":
        used = to_hf(args.src, args.dst, args.tokenizer, args.dtype, args.max_shard_size, args.overwrite,
                     args.packed, tuple(args.plugins))
        print(f"wrote Hugging Face model {args.dst} from checkpoint {used}")
    elif args.cmd == "from-megatron":
        from polytron.tools.megatron_ckpt import from_megatron
        out = from_megatron(args.src, args.dst, args.overwrite)
        print(f"wrote checkpoint {os.path.join(args.dst, 'checkpoint')} and run config {out}")
    elif args.cmd == "from-yoco-released":
        out = from_yoco_released(args.src, args.dst, args.params, args.rope_pairing, args.seq_len, args.overwrite)
        print(f"wrote checkpoint {os.path.join(args.dst, 'checkpoint')} and run config {out}")
    elif args.cmd == "to-megatron":
        from polytron.tools.megatron_ckpt import MEGATRON_CONFIG, to_megatron
        used = to_megatron(args.src, args.dst, args.overwrite, tuple(args.plugins))
        print(f"wrote megatron-core torch_dist checkpoint {args.dst} from checkpoint {used} "
              f"(model arguments: {os.path.join(args.dst, MEGATRON_CONFIG)})")
    else:
        out = from_hf(args.src, args.dst, args.seq_len, args.overwrite)
        print(f"wrote checkpoint {os.path.join(args.dst, 'checkpoint')} and run config {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
