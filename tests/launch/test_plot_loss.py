"""tools/plot_loss.py: reads --log-json lines, plots them, and checks the loss fell."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.launch.launchers import REPO_ROOT


def _load_tool():
    spec = importlib.util.spec_from_file_location("plot_loss", REPO_ROOT / "tools" / "plot_loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot_loss = _load_tool()


def _write_log(path: Path, losses: list[float]) -> Path:
    records = [
        {
            "kind": "train",
            "step": 2 * (i + 1),
            "loss": loss,
            "lr": 1e-3,
            "loss_scale": 1.0,
            "loss_hex": float(loss).hex(),
        }
        for i, loss in enumerate(losses)
    ]
    records.insert(3, {"kind": "eval", "step": 6, "losses": {"bert": 5.5, "gpt": 6.5}})
    records.append({"kind": "train", "step": 99, "loss": 0.0, "rank": 1})  # not rank 0: ignored
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    return path


def test_reads_train_and_eval_curves(tmp_path: Path) -> None:
    log = _write_log(tmp_path / "log.jsonl", [9.0, 8.0, 7.0, 6.0])
    curves = plot_loss.read_curves(log.read_text().splitlines())
    assert curves == {
        "loss": [(2, 9.0), (4, 8.0), (6, 7.0), (8, 6.0)],
        "eval/bert": [(6, 5.5)],
        "eval/gpt": [(6, 6.5)],
    }
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        plot_loss.read_curves(['{"step": 1, "loss": 2}', "iteration 2 | loss 3"])


def test_plot_and_required_drop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = _write_log(tmp_path / "log.jsonl", [9.0, 7.0, 6.5, 6.0, 6.4, 5.8, 6.2, 5.6])
    png = tmp_path / "out" / "loss.png"
    # first 9.0, mean of the last 5 = 6.0: a drop of 3.0
    assert plot_loss.main([str(log), "--output", str(png), "--require-drop", "loss", "2.9"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "OK: loss fell from 9.0000" in capsys.readouterr().out
    assert plot_loss.main([str(log), "--output", str(png), "--require-drop", "loss", "3.1"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert plot_loss.main([str(log), "--output", str(png), "--require-drop", "lm_loss", "1"]) == 1
    # Too few points for the tail: fails rather than comparing a point with itself.
    short = _write_log(tmp_path / "short.jsonl", [9.0, 1.0])
    assert plot_loss.main([str(short), "--output", str(png), "--require-drop", "loss", "1"]) == 1
