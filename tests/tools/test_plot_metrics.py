"""tools/plot_metrics.py renders a PNG from a metrics JSONL and rejects bad files clearly."""
import json
import math

import pytest

from polytron.tools import plot_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, n=40, eval_every=10):
    with open(path, "w") as f:
        for it in range(1, n + 1):
            f.write(json.dumps({"iteration": it, "loss": 5 * math.exp(-it / 20) + 2,
                                "lr": 1e-3 * min(1, it / 5), "grad_norm": 1.0,
                                "tokens_per_s": 600.0 + it, "mfu": 0.4}) + "\n")
            if it % eval_every == 0:
                f.write(json.dumps({"iteration": it, "eval_loss": 5 * math.exp(-it / 20) + 2.1}) + "\n")


def test_run_dir_default_output(tmp_path, capsys):
    write_metrics(tmp_path / "metrics.jsonl")
    assert plot_metrics.main([str(tmp_path)]) == 0
    png = tmp_path / "metrics.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "eval_loss" in capsys.readouterr().out


def test_jsonl_with_output(tmp_path):
    src = tmp_path / "m.jsonl"
    write_metrics(src)
    out = tmp_path / "sub" / "curves.png"
    assert plot_metrics.main([str(src), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plotted_keys(tmp_path):
    src = tmp_path / "m.jsonl"
    write_metrics(src)
    keys = plot_metrics.plot(plot_metrics.read_metrics(str(src)), str(tmp_path / "p.png"))
    assert keys == ["loss", "eval_loss", "lr", "tokens_per_s", "grad_norm"]


def test_missing_file(tmp_path, capsys):
    assert plot_metrics.main([str(tmp_path / "nope")]) == 2
    assert "metrics file not found" in capsys.readouterr().err


def test_empty_file(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("\n\n")
    assert plot_metrics.main([str(tmp_path)]) == 2
    assert "empty" in capsys.readouterr().err


@pytest.mark.parametrize("bad, needle", [("{not json", "not valid JSON"),
                                         ("[1, 2]", "expected a JSON object"),
                                         ('{"loss": 1.0}', "iteration")])
def test_malformed_line_named(tmp_path, capsys, bad, needle):
    src = tmp_path / "metrics.jsonl"
    src.write_text(json.dumps({"iteration": 1, "loss": 2.0}) + "\n" + bad + "\n")
    assert plot_metrics.main([str(src)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line 2" in err and str(src) in err and needle in err


def test_binary_file_is_one_error_line(tmp_path, capsys):
    """A binary file (not UTF-8) given as the metrics file: one line naming it, not a
    UnicodeDecodeError traceback."""
    src = tmp_path / "metrics.jsonl"
    src.write_bytes(json.dumps({"iteration": 1, "loss": 2.0}).encode() + b"\n\x89PNG\r\n\x1a\n\xff\xfe\x00\x9a")
    assert plot_metrics.main([str(src)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(src) in err[0] and "not UTF-8" in err[0], err


def test_unwritable_png_is_one_error_line(tmp_path, capsys):
    src = tmp_path / "m.jsonl"
    write_metrics(src, n=4)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert plot_metrics.main([str(src), "--output", str(blocker / "curves.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {blocker / 'curves.png'}"), err
