"""Checkpoint publishing protocol, selection of the newest complete checkpoint, pruning.

Single process with a stand-in for the DeepSpeed engine (the multi-process behaviour with the
real engine is in tests/distributed/test_resume.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_glm.parallel.random import get_all_rng_states, set_all_rng_states
from megatron_glm.training.checkpointing import (
    COMPLETE_MARKER,
    LATEST_FILE,
    LATEST_ITERATION_FILE,
    META_FILE,
    find_latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_file_name,
    save_checkpoint,
)


class FakeEngine:
    """Writes one file per save the way DeepSpeed does (into ``save_dir/tag``)."""

    checkpoint_engine = None  # load_checkpoint swaps in its weights-only reader while it loads

    def __init__(self) -> None:
        self.loaded: list[tuple[str, str]] = []

    def save_checkpoint(
        self, save_dir: str, tag: str, client_state: dict[str, Any], save_latest: bool
    ) -> None:
        assert save_latest is False, "DeepSpeed's own `latest` must stay disabled"
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        (path / "mp_rank_00_model_states.pt").write_text(json.dumps(client_state))

    def load_checkpoint(self, load_dir: str, tag: str, **_: Any) -> tuple[str, dict[str, Any]]:
        self.loaded.append((load_dir, tag))
        path = Path(load_dir) / tag
        return str(path), json.loads((path / "mp_rank_00_model_states.pt").read_text())


def _save(root: Path, iteration: int, **kwargs: Any) -> Path:
    return save_checkpoint(
        FakeEngine(),
        root,
        iteration,
        consumed_samples=4 * iteration,
        config={"it": iteration},
        rng_states=get_all_rng_states(),
        **kwargs,
    )


def test_save_publishes_complete_checkpoint(tmp_path: Path) -> None:
    tag_dir = _save(tmp_path, 7)
    assert (tmp_path / LATEST_FILE).read_text() == "7"
    assert (tmp_path / LATEST_ITERATION_FILE).read_text() == "7"
    assert (tag_dir / COMPLETE_MARKER).is_file()
    meta = json.loads((tag_dir / META_FILE).read_text())
    assert (meta["iteration"], meta["consumed_samples"], meta["config"]) == (7, 28, {"it": 7})
    assert {"torch", "deepspeed", "megatron_glm"} <= set(meta["versions"])
    states = torch.load(tag_dir / rng_file_name(0), weights_only=True)  # no pickled objects
    assert torch.equal(states["torch_cpu"], torch.get_rng_state())
    assert not list(tmp_path.rglob("*.tmp")), "temporary files left behind"


def test_failure_before_publish_keeps_previous_latest(tmp_path: Path) -> None:
    _save(tmp_path, 2)

    def crash(iteration: int, tag_dir: Path) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _save(tmp_path, 4, on_written=crash)
    assert (tmp_path / LATEST_FILE).read_text() == "2"
    assert (tmp_path / "4" / "mp_rank_00_model_states.pt").exists()
    assert not (tmp_path / "4" / COMPLETE_MARKER).exists()
    ref = find_latest_checkpoint(tmp_path)
    assert (ref.tag, ref.iteration) == ("2", 2)

    # the retry at the same iteration starts from a clean directory and publishes
    (tmp_path / "4" / "zero_pp_rank_5_stale.pt").write_text("from another layout")
    _save(tmp_path, 4)
    assert not (tmp_path / "4" / "zero_pp_rank_5_stale.pt").exists()
    assert find_latest_checkpoint(tmp_path).iteration == 4


def test_latest_naming_an_incomplete_directory_is_not_trusted(tmp_path: Path) -> None:
    _save(tmp_path, 3)
    _save(tmp_path, 6)
    (tmp_path / "6" / COMPLETE_MARKER).unlink()  # e.g. a half-copied checkpoint directory
    assert find_latest_checkpoint(tmp_path).iteration == 3
    (tmp_path / LATEST_FILE).write_text("12")  # names a directory that does not exist
    assert find_latest_checkpoint(tmp_path).iteration == 3


def test_fresh_start_without_checkpoints(tmp_path: Path) -> None:
    assert find_latest_checkpoint(None) is None
    assert find_latest_checkpoint(tmp_path / "absent") is None
    (tmp_path / "5").mkdir()  # only an incomplete save
    assert find_latest_checkpoint(tmp_path) is None


def test_keep_last_k(tmp_path: Path) -> None:
    for it in (1, 2, 3):
        _save(tmp_path, it, keep_last_k=2)
    (tmp_path / "0").mkdir()  # a dead save older than the newest complete one
    (tmp_path / "9").mkdir()  # a newer incomplete one may be a save in progress: kept
    _save(tmp_path, 4, keep_last_k=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["3", "4", "9"]
    assert prune_checkpoints(tmp_path, 1) == [tmp_path / "3"]


def test_load_returns_state_and_rng_streams(tmp_path: Path) -> None:
    _save(tmp_path, 5)
    saved_draw = (random.random(), torch.rand(3))
    engine = FakeEngine()
    loaded = load_checkpoint(engine, find_latest_checkpoint(tmp_path))
    assert engine.loaded == [(str(tmp_path), "5")]
    assert (loaded.iteration, loaded.consumed_samples) == (5, 20)
    set_all_rng_states(loaded.rng_states)  # back to the state at save time
    assert random.random() == saved_draw[0]
    assert torch.equal(torch.rand(3), saved_draw[1])


def test_checkpoint_of_another_layout_is_refused(tmp_path: Path) -> None:
    config = {"training": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1}}
    save_checkpoint(
        FakeEngine(),
        tmp_path,
        3,
        consumed_samples=12,
        config=config,
        rng_states=get_all_rng_states(),
    )
    ref = find_latest_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="parallel sizes 2/1, this run uses 1/2"):
        load_checkpoint(FakeEngine(), ref, layout=(1, 2))
    assert load_checkpoint(FakeEngine(), ref, layout=(2, 1)).iteration == 3
