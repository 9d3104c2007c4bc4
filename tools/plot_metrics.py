#!/usr/bin/env python
"""Plot a run's training curves: loss (and eval loss), learning rate, throughput.

Reads the metrics JSONL a run writes (one JSON object per line with
``iteration``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu``, ...;
evaluation lines may carry ``eval_loss``) and renders a PNG with matplotlib's
Agg backend (no display needed).

Mixture-of-experts runs (model/moe) add two panels: each MoE layer's largest expert
load over the mean load (``moe/load_max_l<i>``; 1 is balanced) with the dropped
fraction (``moe/dropped_l<i>``) when capacity routing drops, and a layer x expert map
of each expert's share of the assignments (``moe_load.l<i>.e<j>``), averaged over the
logged intervals.

Runs with in-loop downstream evaluation (``evaluation.tasks``, docs/evaluation.md) add a panel
of each task's accuracy (``downstream/<task>/acc``, ``acc_norm``) and one of its bits per byte
(``downstream/<task>/bits_per_byte``).

Usage::

    python tools/plot_metrics.py runs/my-run                # -> runs/my-run/metrics.png
    python tools/plot_metrics.py runs/my-run/metrics.jsonl --output curves.png

A missing file, an empty file, a malformed line or a binary file prints ``error: ...``
naming the file (and line) and exits with status 2; a PNG that cannot be written, one line
and status 1.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
from typing import Optional

from polytron.model.errors import PolytronError, WriteFailed
from polytron.tools.cli import command

METRICS_FILE = "metrics.jsonl"

#: (metric key, panel title, y-axis label) for each panel after the loss panel.
PANELS = [("lr", "Learning rate", "lr"),
          ("tokens_per_s", "Throughput", "tokens/s"),
          ("grad_norm", "Gradient norm", "grad norm")]


class MetricsError(PolytronError, ValueError):
    """A metrics file that cannot be plotted; the message names the file and line."""


def resolve_paths(source: str, output: Optional[str]) -> tuple[str, str]:
    """(jsonl path, png path) for a run directory or a JSONL file."""
    if os.path.isdir(source):
        jsonl = os.path.join(source, METRICS_FILE)
        png = output or os.path.join(source, "metrics.png")
    else:
        jsonl = source
        png = output or os.path.join(os.path.dirname(source) or ".", "metrics.png")
    if not os.path.isfile(jsonl):
        raise MetricsError(f"metrics file not found: {jsonl}")
    return jsonl, png


def read_metrics(path: str) -> list[dict]:
    """Parse every non-blank line of ``path`` into a dict with a numeric ``iteration``."""
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise MetricsError(f"{path}, line {lineno}: not UTF-8 text (a binary file, not a metrics "
                                   "JSONL?)") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise MetricsError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise MetricsError(f"{path}, line {lineno}: expected a JSON object, "
                                   f"got {type(rec).__name__}")
            if not _is_number(rec.get("iteration")):
                raise MetricsError(f"{path}, line {lineno}: missing numeric 'iteration'")
            records.append(rec)
    if not records:
        raise MetricsError(f"{path}: no metrics lines (empty file)")
    return records


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(iterations, values) of the records that carry a finite number under ``key``."""
    pts = [(r["iteration"], r[key]) for r in records if _is_number(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(records: list[dict], png: str, title: str = "") -> list[str]:
    """Render the panels present in ``records`` to ``png``; returns the keys plotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "Loss", "loss")] + [p for p in PANELS if series(records, p[0])[0]]
    moe = expert_load(records)
    tasks = downstream_keys(records)
    extra = int(bool(moe[0])) + int(moe[2] is not None) + sum(1 for keys in tasks if keys)
    fig, axes = plt.subplots(len(panels) + extra, 1, figsize=(8, 2.6 * (len(panels) + extra)),
                             squeeze=False)
    plotted = []
    for ax, (key, name, ylabel) in zip(axes[:, 0], panels):
        x, y = series(records, key)
        if x:
            ax.plot(x, y, lw=1.2, label="train" if key == "loss" else None)
            plotted.append(key)
        if key == "loss":
            ex, ey = series(records, "eval_loss")
            if ex:
                ax.plot(ex, ey, "o-", ms=4, lw=1.2, label="eval")
                plotted.append("eval_loss")
            if plotted:
                ax.legend(loc="upper right")
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_title(name, fontsize=10, loc="left")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes[1:len(panels), 0]:
        ax.sharex(axes[0, 0])
    axes[len(panels) - 1, 0].set_xlabel("iteration")
    plotted += plot_expert_load(records, moe, axes[len(panels):, 0])
    plotted += plot_downstream(records, tasks, axes[len(panels) + extra - sum(1 for k in tasks if k):, 0])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return plotted


def _layer_keys(records: list[dict], prefix: str) -> list[str]:
    keys = {k for r in records for k in r if k.startswith(prefix)}
    return sorted(keys, key=lambda k: int(k[len(prefix):]))


def expert_load(records: list[dict]) -> tuple[list[str], list[str], Optional[list[list[float]]]]:
    """(load_max keys, dropped keys, layer x expert mean shares or None) of an MoE run."""
    shares: dict[tuple[int, int], list[float]] = {}
    for r in records:
        for k, v in r.items():
            if k.startswith("moe_load.l") and _is_number(v):
                layer, expert = k[len("moe_load.l"):].split(".e")
                shares.setdefault((int(layer), int(expert)), []).append(v)
    grid = None
    if shares:
        layers = sorted({lay for lay, _ in shares})
        experts = 1 + max(e for _, e in shares)
        grid = [[sum(shares.get((lay, e), [0.0])) / max(1, len(shares.get((lay, e), [])))
                 for e in range(experts)] for lay in layers]
    return _layer_keys(records, "moe/load_max_l"), _layer_keys(records, "moe/dropped_l"), grid


def plot_expert_load(records: list[dict], moe, axes) -> list[str]:
    """Draw the MoE panels on ``axes``; returns the keys plotted."""
    load_keys, drop_keys, grid = moe
    plotted, i = [], 0
    if load_keys:
        ax = axes[i]
        for key in load_keys:
            x, y = series(records, key)
            ax.plot(x, y, lw=1.2, label=f"layer {key.rsplit('_l', 1)[1]}")
            plotted.append(key)
        for key in drop_keys:
            x, y = series(records, key)
            ax.plot(x, y, "--", lw=1.0, label=f"dropped, layer {key.rsplit('_l', 1)[1]}")
            plotted.append(key)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_title("Expert load: largest / mean (dashed: dropped fraction)", fontsize=10, loc="left")
        ax.set_xlabel("iteration")
        ax.legend(loc="upper right", fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        i += 1
    if grid is not None:
        ax = axes[i]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title("Expert share of assignments (mean over the run)", fontsize=10, loc="left")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        layers = sorted({int(k[len("moe_load.l"):].split(".e")[0]) for r in records for k in r
                         if k.startswith("moe_load.l")})
        ax.set_yticks(range(len(layers)), [str(lay) for lay in layers])
        ax.figure.colorbar(im, ax=ax)
        plotted.append("moe_load")
    return plotted


def downstream_keys(records: list[dict]) -> tuple[list[str], list[str]]:
    """(accuracy keys, bits-per-byte keys) of in-loop downstream evaluation."""
    keys = sorted({k for r in records for k in r if k.startswith("downstream/")})
    return ([k for k in keys if k.endswith(("/acc", "/acc_norm"))],
            [k for k in keys if k.endswith("/bits_per_byte")])


def plot_downstream(records: list[dict], tasks: tuple[list[str], list[str]], axes) -> list[str]:
    """Draw the downstream accuracy and bits-per-byte panels present; returns the keys plotted."""
    plotted, i = [], 0
    for keys, title, ylabel in zip(tasks, ("Downstream accuracy", "Downstream bits per byte"),
                                   ("accuracy", "bits/byte")):
        if not keys:
            continue
        ax = axes[i]
        for key in keys:
            x, y = series(records, key)
            ax.plot(x, y, "o-", ms=3, lw=1.2, label=key[len("downstream/"):])
            plotted.append(key)
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.legend(loc="best", fontsize=7)
        ax.grid(alpha=0.3)
        i += 1
    return plotted


@command
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Plot loss / lr / throughput curves of a run.")
    p.add_argument("source", help="Run directory (holding metrics.jsonl) or a metrics JSONL file.")
    p.add_argument("--output", help="PNG path (default: <run_dir>/metrics.png).")
    args = p.parse_args(argv)
    try:
        jsonl, png = resolve_paths(args.source, args.output)
        records = read_metrics(jsonl)
    except OSError as e:                 # an unreadable metrics file is bad input
        raise MetricsError(str(e)) from None
    run_name = os.path.basename(os.path.dirname(os.path.abspath(jsonl)))
    try:
        plotted = plot(records, png, title=run_name)
    except OSError as e:
        raise WriteFailed(e.errno or errno.EIO, f"cannot write {png}: {e.strerror or e}") from None
    print(f"wrote {png} ({len(records)} lines; {', '.join(plotted) or 'no curves'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
