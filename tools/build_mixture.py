#!/usr/bin/env python
"""Build an Instruction Pre-Training mixture: datasets per source, the blend, a run config.

    python tools/build_mixture.py --config mixture.yaml [output=DIR seq_len=N ...] [--composition N]

The mixture config (data/mixture.py, ``MixtureConfig``; ``--help-config`` lists every key)
names the tokenizer, the output directory, the training sequence length and the sources
with their token ratios: ``augmented`` (records of tools/synthesize_instructions.py),
``raw`` (text files or an existing dataset) and ``instruction`` (general instruction data,
optionally trained on responses only). Trailing ``key=value`` arguments replace top-level
keys. Writes into the output directory:

* ``<name>.bin/.idx`` per source (``<name>.lossmask.bin/.idx`` for response-only loss) and
  ``<name>.summary.json`` recording the tokenizer's fingerprint;
* ``mixture.json``: the tokenizer and its fingerprint, per source its dataset, documents, tokens, loss tokens, ratio,
  weight and source id (``loss/source<id>`` in the training log), plus formatting statistics;
* ``pretrain.yaml``: ``run_config`` (a launch/configs/ipt-*.yaml recipe) with ``data.paths``,
  ``data.weights``, ``data.tokenizer`` and ``data.seq_len`` set::

      python launch/pretrain.py --config OUTPUT/pretrain.yaml

``--composition N`` then draws the first N training samples through the training loader
and prints each source's realized share of tokens and of loss tokens.

A raw source ``prefix`` whose summary records another tokenizer fingerprint than the
mixture's tokenizer, or a source that would read another source's output (compared as
files, through symlinks and hard links), is refused.

Exit status 0; 2 with one ``error:`` line for bad input (config key, input file, tokenizer).
"""
from __future__ import annotations

import argparse
import os
import sys

from polytron.tools.cli import command


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Build an Instruction Pre-Training data mixture.")
    p.add_argument("--config", help="mixture YAML")
    p.add_argument("--composition", type=int, default=0, metavar="N",
                   help="measure the realized token shares over the first N training samples")
    p.add_argument("--help-config", action="store_true", help="list every mixture key with its documentation")
    p.add_argument("overrides", nargs="*", help="top-level key=value overrides")
    return p.parse_args(argv)


def help_config() -> None:
    from polytron.data.mixture import MixtureConfig, SourceConfig
    from polytron.model.configlib import field_docs

    for key, text, default in field_docs(MixtureConfig) + field_docs(SourceConfig, "sources[i]."):
        print(f"{key} = {default!r}\n    {text}")


def overrides_of(texts: list[str]) -> dict:
    from polytron.model.configlib import ConfigError, parse_override

    out = {}
    for text in texts:
        keys, value = parse_override(text)
        if len(keys) != 1:
            raise ConfigError(f"override {text!r}: only top-level keys can be overridden")
        out[keys[0]] = value
    return out


def check_run_config(path: str) -> None:
    """The written pretrain.yaml must load as a run config (key names, types, ranges)."""
    from polytron.pretrain.config import load_config

    load_config(path)


def report(manifest: dict) -> None:
    print(f"{'id':>2}  {'source':<16} {'kind':<11} {'documents':>10} {'tokens':>12} {'loss tokens':>12} "
          f"{'ratio':>7}")
    for s in manifest["sources"]:
        print(f"{s['source_id']:>2}  {s['name']:<16} {s['kind']:<11} {s['documents']:>10} {s['tokens']:>12} "
              f"{s['loss_tokens']:>12} {s['weight']:>7.3f}")


def composition(manifest: dict, samples: int, out: str) -> None:
    from polytron.data.mixture import realized_composition

    rows = realized_composition(manifest["paths"], manifest["weights"], manifest["tokenizer"],
                                manifest["seq_len"], samples, manifest["seed"], os.path.join(out, ".cache"))
    print(f"realized over the first {samples} training samples:")
    print(f"{'id':>2}  {'source':<16} {'samples':>8} {'token share':>12} {'target':>8} {'loss-token share':>17}")
    for row, src in zip(rows, manifest["sources"]):
        print(f"{row['source_id']:>2}  {src['name']:<16} {row['samples']:>8} {row['tokens_share']:>12.4f} "
              f"{src['weight']:>8.4f} {row['loss_tokens_share']:>17.4f}")


@command
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.help_config:
        help_config()
        return 0
    from polytron.data.mixture import build_mixture, load_mixture
    from polytron.model.configlib import ConfigError

    if not args.config:
        raise ConfigError("--config is required (a mixture YAML; see --help-config)")
    cfg = load_mixture(args.config, overrides_of(args.overrides))
    manifest = build_mixture(cfg)
    out = os.path.abspath(os.path.expanduser(cfg.output))
    check_run_config(os.path.join(out, "pretrain.yaml"))
    report(manifest)
    if args.composition > 0:
        composition(manifest, args.composition, out)
    print(f"wrote {os.path.join(out, 'mixture.json')} and {os.path.join(out, 'pretrain.yaml')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
