"""Provenance: a checkpoint or model directory is data, never code.

A run config stored in a checkpoint may list ``model.plugins`` (modules imported to
register an architecture or layer kind kept outside this repository). A tool that reads
someone else's checkpoint must not import them on the file's say-so: the user names the
modules they trust with ``--plugin MODULE`` (repeatable). A checkpoint that lists a
plugin the user did not name is refused with one line naming it and the flag, even when
the architecture is built in: a plugin may change built-in layers on import (hooks,
registry wrappers), so a model built without it need not be the model that was trained.

Training from a config the user passes (``launch/pretrain.py --config``) still imports
that config's plugins: the config is the user's own statement.
"""
from __future__ import annotations

import argparse
from typing import Any, Sequence

from polytron.model.configlib import ConfigError

PLUGIN_FLAG = "--plugin"


class UntrustedCode(ConfigError):
    """A file asks for code to be imported that the user did not name."""


def add_plugin_option(parser: argparse.ArgumentParser) -> None:
    """``--plugin MODULE`` (repeatable) -> ``args.plugins``: the only plugins the tool imports."""
    parser.add_argument(PLUGIN_FLAG, dest="plugins", action="append", default=[], metavar="MODULE",
                        help="import this model plugin (a module a checkpoint's model.plugins lists); "
                             "plugins recorded in a checkpoint are never imported unless named here")


def listed_plugins(model_section: Any, source: str) -> list[str]:
    """The ``plugins`` a stored model config lists (a ConfigError when it is not a list of names)."""
    if not isinstance(model_section, dict):
        return []
    listed = model_section.get("plugins") or []
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        raise ConfigError(f"{source}: config key 'model.plugins' is {listed!r}, not a list of module names")
    return listed


def check_plugins(model_section: Any, named: Sequence[str], source: str) -> None:
    """Refuse a stored model config whose plugins the user did not name with ``--plugin``.

    ``model_section`` is the ``model`` mapping of a run config read from ``source`` (a
    checkpoint or file); nothing is imported here."""
    missing = [p for p in listed_plugins(model_section, source) if p not in named]
    if missing:
        flags = " ".join(f"{PLUGIN_FLAG} {p}" for p in missing)
        raise UntrustedCode(f"{source} lists model.plugins {', '.join(missing)}: code named by a checkpoint "
                          f"is not imported; if you trust it, pass {flags}")


def trusted_model_config(model_section: Any, named: Sequence[str], source: str):
    """The validated ModelConfig of a stored model section, importing only the plugins the
    user named (after :func:`check_plugins`)."""
    from polytron.model.config import ModelConfig, load_plugins
    from polytron.model.configlib import from_dict
    check_plugins(model_section, named, source)
    if not isinstance(model_section, dict):
        raise ConfigError(f"{source}: the model config is {type(model_section).__name__}, not a mapping")
    load_plugins(list(named))
    cfg = from_dict(ModelConfig, model_section, prefix="model.")
    cfg.validate()
    return cfg


__all__ = ["PLUGIN_FLAG", "UntrustedCode", "add_plugin_option", "listed_plugins", "check_plugins",
           "trusted_model_config"]
