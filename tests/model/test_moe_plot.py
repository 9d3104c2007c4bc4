"""tools/plot_metrics.py draws the expert-load panels of a mixture-of-experts run."""
import json

import pytest

from polytron.tools import plot_metrics


def test_expert_load_panels(tmp_path, capsys):
    src = tmp_path / "metrics.jsonl"
    with open(src, "w") as f:
        for it in (10, 20, 30):
            rec = {"iteration": it, "loss": 5.0 - it / 10, "lr": 1e-3}
            for layer in (1, 2):
                rec[f"moe/load_max_l{layer}"] = 3.0 - it / 20
                rec[f"moe/dropped_l{layer}"] = 0.1
                rec.update({f"moe_load.l{layer}.e{e}": (0.4 if e == 0 else 0.2) for e in range(4)})
            f.write(json.dumps(rec) + "\n")
    keys = plot_metrics.plot(plot_metrics.read_metrics(str(src)), str(tmp_path / "p.png"))
    assert keys == ["loss", "lr", "moe/load_max_l1", "moe/load_max_l2", "moe/dropped_l1", "moe/dropped_l2",
                    "moe_load"]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loads, dropped, grid = plot_metrics.expert_load(plot_metrics.read_metrics(str(src)))
    assert [pytest.approx(row) for row in grid] == [[0.4, 0.2, 0.2, 0.2]] * 2
    assert plot_metrics.main([str(tmp_path)]) == 0 and "moe_load" in capsys.readouterr().out
