"""tools/synthesize_instructions.py treats a Hugging Face model directory as data (issue 25):
pickled weights are refused before anything is unpickled, custom code named by ``auto_map``
is not run and no prompt reads stdin (a piped "y" changes nothing), both with one ``error:``
line and exit 2; ``--trust-remote-code`` is the explicit way to run such code.

Every code path the directories offer writes a marker file when run; the tests assert that
no marker appears (and, with the flag, that it does: the fixture's code is live)."""
from __future__ import annotations

import io
import json
import os
import sys

import pytest
import torch

from polytron.tools import synthesize_instructions as tool
from tests.checkpoint.helpers import hf_llama, train_spm


class _Payload:
    """Pickles to a call of ``exec`` that writes the marker file when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'a').write('pickle\\n')",)


def _remote_code(directory: str, marker: str) -> None:
    """Make ``directory`` (a Llama directory) name custom config/model/tokenizer classes in
    Python files of its own that append their name to ``marker`` when imported."""
    cfg_file, tok_file = os.path.join(directory, "config.json"), os.path.join(directory, "tokenizer_config.json")
    cfg = json.load(open(cfg_file))
    cfg.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    json.dump(cfg, open(cfg_file, "w"))
    tok = json.load(open(tok_file))
    tok.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    json.dump(tok, open(tok_file, "w"))
    for name in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        with open(os.path.join(directory, name + ".py"), "w") as f:
            f.write(f"open({marker!r}, 'a').write({name!r} + '\\n')\n")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("synth-badinput")
    tok = train_spm(str(root))
    pickled, remote = str(root / "pickled"), str(root / "remote")
    marker = str(root / "MARKER")
    hf_llama(pickled, tokenizer=tok)
    os.remove(os.path.join(pickled, "model.safetensors"))
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, os.path.join(pickled, "pytorch_model.bin"))
    hf_llama(remote, tokenizer=tok)
    _remote_code(remote, marker)
    raw = root / "raw.jsonl"
    raw.write_text(json.dumps({"text": "A short document about nothing in particular."}) + "\n")
    return {"root": root, "pickled": pickled, "remote": remote, "marker": marker, "raw": str(raw)}


def _argv(d: dict, model: str, out: str, *extra: str) -> list[str]:
    return ["--model", d[model], "--input", d["raw"], "--output", str(d["root"] / out), "--no-progress",
            "--max-new-tokens", "2", *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("model,needle", [("pickled", "weights are pickled (pytorch_model.bin)"),
                                          ("remote", "--trust-remote-code")])
def test_model_directory_code_is_never_run_nor_asked_about(dirs, capsys, monkeypatch, model, needle):
    """A piped "y" on stdin (what answered transformers' "run the custom code? [y/N]" prompt)
    stays unread; no marker, one line, exit 2, no output written."""
    stdin = io.StringIO("y\ny\ny\n")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert tool.main(_argv(dirs, model, f"{model}.jsonl")) == 2
    assert needle in _one_error_line(capsys)
    assert not os.path.exists(dirs["marker"]), open(dirs["marker"]).read()
    assert stdin.read() == "y\ny\ny\n"                             # never read
    assert not os.path.exists(dirs["root"] / f"{model}.jsonl")


def test_trust_remote_code_is_the_explicit_way(dirs, capsys):
    """With --trust-remote-code the directory's own code runs (its modules are no real model,
    so loading then fails with one line): the fixture above would have shown a marker."""
    assert tool.main(_argv(dirs, "remote", "trusted.jsonl", "--trust-remote-code")) == 2
    _one_error_line(capsys)
    assert "configuration_evil" in open(dirs["marker"]).read()
    os.remove(dirs["marker"])
