"""Checkpoint integrity (docs/checkpoints.md#integrity): the manifest written last, verification on
resume, ``--load-fallback``, pointer files, a changed model, protected checkpoints, and SIGKILL at
every fault point of a save.

The first tests are single-process, with a stand-in engine that writes and reads torch files the
way DeepSpeed does (through ``engine.checkpoint_engine``). The last ones run ``pretrain_glm.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_glm.config import GLMConfig
from megatron_glm.conversion.canonical import CheckpointError
from megatron_glm.integrity import sha256_file
from megatron_glm.parallel.random import get_all_rng_states
from megatron_glm.training.checkpointing import (
    COMPLETE_MARKER,
    LATEST_FILE,
    LATEST_ITERATION_FILE,
    META_FILE,
    CheckpointRef,
    LoadDirError,
    checkpoint_to_resume,
    find_latest_checkpoint,
    load_checkpoint,
    protect_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from megatron_glm.training.manifest import KEEP_MARKER, Manifest, model_fingerprint
from tests.training.helpers import Corpus, launch, pretrain_args, read_log, write_ds_config

MODEL = GLMConfig(
    num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, max_sequence_length=16
)
MODEL_FILE = "mp_rank_00_model_states.pt"


class TorchFileEngine:
    """Writes DeepSpeed-like torch files into ``save_dir/tag`` and reads them back through
    ``self.checkpoint_engine`` (the reader ``load_checkpoint`` installs), as DeepSpeed does."""

    checkpoint_engine: Any = None

    def save_checkpoint(
        self, save_dir: str, tag: str, client_state: dict[str, Any], save_latest: bool
    ) -> None:
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        state = {"module": {"w": torch.full((4,), float(client_state["iteration"]))}}
        torch.save({**state, **client_state}, path / MODEL_FILE)
        torch.save({"exp_avg": torch.ones(4)}, path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")

    def load_checkpoint(self, load_dir: str, tag: str, **_: Any) -> tuple[str, dict[str, Any]]:
        path = Path(load_dir) / tag
        saved = self.checkpoint_engine.load(str(path / MODEL_FILE))
        self.checkpoint_engine.load(str(path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
        return str(path / MODEL_FILE), {k: v for k, v in saved.items() if k != "module"}


def _save(root: Path, iteration: int, **kwargs: Any) -> Path:
    config = {"model": MODEL.to_dict(), "training": {"seed": 1}}
    return save_checkpoint(
        TorchFileEngine(),
        root,
        iteration,
        consumed_samples=4 * iteration,
        config=config,
        rng_states=get_all_rng_states(),
        layout_free=False,
        **kwargs,
    )


def _flip_byte(path: Path, offset: int = -9) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _problems(err: pytest.ExceptionInfo[Any]) -> str:
    return str(err.value)


def test_manifest_is_written_last_and_lists_every_file(tmp_path: Path) -> None:
    tag_dir = _save(tmp_path, 6)
    manifest = Manifest.read(tag_dir)
    assert (manifest.iteration, manifest.consumed_samples, manifest.world_size) == (6, 24, 1)
    assert manifest.model_fingerprint == model_fingerprint(MODEL.to_dict())
    files = sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*") if p.is_file())
    assert sorted(manifest.files) == sorted(set(files) - {COMPLETE_MARKER})
    for name, entry in manifest.files.items():
        assert entry == {
            "size": (tag_dir / name).stat().st_size,
            "sha256": sha256_file(tag_dir / name),
        }
    # written last: no file of the checkpoint is newer than the manifest
    newest = max((tag_dir / name).stat().st_mtime_ns for name in manifest.files)
    assert (tag_dir / COMPLETE_MARKER).stat().st_mtime_ns >= newest
    assert checkpoint_to_resume(tmp_path, model=MODEL) == CheckpointRef("6", 6, tag_dir)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("name", [MODEL_FILE, "rng_state_rank00000.pt", META_FILE])
def test_damaged_file_is_named_and_fallback_takes_the_older(
    damage: str, name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    path = newest / name
    if damage == "flip":
        _flip_byte(path)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.unlink()
    with pytest.raises(LoadDirError) as err:
        checkpoint_to_resume(tmp_path, model=MODEL)
    assert str(path) in _problems(err) and "--load-fallback" in _problems(err)
    expected = {"flip": "SHA-256 differs", "truncate": "truncated", "delete": "missing"}[damage]
    assert expected in _problems(err)
    with caplog.at_level(logging.WARNING):
        ref = checkpoint_to_resume(tmp_path, model=MODEL, fallback=True)
    assert ref is not None and ref.iteration == 2
    assert "--load-fallback: resuming checkpoint 2" in caplog.text and str(path) in caplog.text
    if damage != "flip":  # sizes are checked without the digests too
        with pytest.raises(LoadDirError, match=str(path)):
            checkpoint_to_resume(tmp_path, hashes=False)


def test_no_checkpoint_verifies(tmp_path: Path) -> None:
    for it in (2, 4):
        _flip_byte(_save(tmp_path, it) / MODEL_FILE)
    with pytest.raises(LoadDirError, match="no complete checkpoint verifies") as err:
        checkpoint_to_resume(tmp_path, fallback=True)
    assert str(tmp_path / "2" / MODEL_FILE) in _problems(err)
    assert str(tmp_path / "4" / MODEL_FILE) in _problems(err)


def test_edited_iteration_is_caught_without_digests(tmp_path: Path) -> None:
    """The issue's "stopped at iteration 40 of 6": the metadata's iteration edited, same size."""
    tag_dir = _save(tmp_path, 6)
    meta = tag_dir / META_FILE
    text = meta.read_text()
    meta.write_text(text.replace('"iteration": 6', '"iteration": 4'))
    assert len(meta.read_text()) == len(text)
    with pytest.raises(LoadDirError, match="SHA-256 differs"):
        checkpoint_to_resume(tmp_path)
    with pytest.raises(LoadDirError) as err:
        checkpoint_to_resume(tmp_path, hashes=False)
    assert f"{meta}: iteration 4, 24 consumed samples; the manifest says 6, 24" in _problems(err)
    # and a manifest copied into another iteration's directory
    (tmp_path / "6").rename(tmp_path / "8")
    with pytest.raises(LoadDirError, match="iteration 6, the directory is 8"):
        checkpoint_to_resume(tmp_path, hashes=False)


def test_unlisted_file_is_refused_and_keep_is_not_content(tmp_path: Path) -> None:
    tag_dir = _save(tmp_path, 3)
    (tag_dir / KEEP_MARKER).write_text("kept\n")
    (tag_dir / ".nfs0001").write_text("a file system's own")
    assert checkpoint_to_resume(tmp_path) is not None
    extra = tag_dir / "layer_07-model_00-model_states.pt"  # DeepSpeed globs for these
    torch.save({"w": torch.zeros(1)}, extra)
    with pytest.raises(LoadDirError, match=f"{extra}: not in the manifest"):
        checkpoint_to_resume(tmp_path)


def test_another_model_is_refused_with_every_field(tmp_path: Path) -> None:
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    other = dataclasses.replace(MODEL, num_layers=3, num_attention_heads=8)
    for fallback in (False, True):
        with pytest.raises(LoadDirError) as err:
            checkpoint_to_resume(tmp_path, model=other, fallback=fallback)
        message = _problems(err)
        assert "checkpoint 4 was trained with another model" in message
        assert "num_attention_heads is 4, the given model config says 8" in message
        assert "num_layers is 2, the given model config says 3" in message
        assert "hidden_size" not in message


@pytest.mark.parametrize(
    "pointer",
    [b"../outside/9", b"/etc", b"..", b"9/../../outside/9", b"\xff\xfe", b"9" * 100, b"missing"],
)
def test_pointer_files_never_lead_outside(pointer: bytes, tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save(root, 2)
    outside = _save(tmp_path / "outside", 9)  # a complete checkpoint next to --load
    for name in (LATEST_FILE, LATEST_ITERATION_FILE):
        (root / name).write_bytes(pointer)
    ref = checkpoint_to_resume(root)
    assert ref is not None and ref.path == root / "2"
    (root / "9").symlink_to(outside, target_is_directory=True)  # a link out of --load
    assert find_latest_checkpoint(root).path == root / "2"


def test_pointer_to_an_older_checkpoint_is_followed(tmp_path: Path) -> None:
    """Pointing ``latest`` back resumes there (docs: resuming from an earlier checkpoint); with
    fallback only older ones are tried after it."""
    for it in (2, 4, 6):
        _save(tmp_path, it)
    (tmp_path / LATEST_FILE).write_text("4")
    assert checkpoint_to_resume(tmp_path).iteration == 4
    _flip_byte(tmp_path / "4" / MODEL_FILE)
    assert checkpoint_to_resume(tmp_path, fallback=True).iteration == 2


def test_protected_checkpoint_outlives_keep_last_k(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    assert protect_checkpoint(tmp_path, "loss spike at iteration 2") == tmp_path / "1"
    for it in (2, 3, 4):
        _save(tmp_path, it, keep_last_k=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["1", "4"]
    assert (tmp_path / "1" / KEEP_MARKER).read_text() == "loss spike at iteration 2\n"
    assert prune_checkpoints(tmp_path, 1) == []
    assert protect_checkpoint(tmp_path / "empty", "x") is None


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_load_names_a_damaged_file(damage: str, tmp_path: Path) -> None:
    """Without the verification (a file damaged after it): the reader names the file; no raw
    EOFError/AssertionError/MemoryError."""
    tag_dir = _save(tmp_path, 5)
    ref = find_latest_checkpoint(tmp_path)
    optim = tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if damage == "truncate":
        optim.write_bytes(optim.read_bytes()[:300])
    elif damage == "delete":
        optim.unlink()
    else:  # a different iteration in DeepSpeed's client state than in the metadata
        state = torch.load(tag_dir / MODEL_FILE, weights_only=True)
        torch.save({**state, "iteration": 40}, tag_dir / MODEL_FILE)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(TorchFileEngine(), ref)
    target = tag_dir / MODEL_FILE if damage == "flip" else optim
    assert str(target) in _problems(err), _problems(err)


def test_flags_reach_the_training_config(glm_corpus: Corpus, tmp_path: Path) -> None:
    from megatron_glm.training.arguments import parse_run_config

    config = write_ds_config(tmp_path / "ds.json", train_batch=4, micro=4)
    args = pretrain_args(glm_corpus, config, tmp_path / "log.jsonl", iters=1, bert_prob=0.5)
    default = parse_run_config(args, 1, check_data=False).training
    assert (default.load_fallback, default.verify_checkpoint_hashes) == (False, True)
    flags = ["--load-fallback", "--no-verify-checkpoint-hashes"]
    given = parse_run_config([*args, *flags], 1, check_data=False).training
    assert (given.load_fallback, given.verify_checkpoint_hashes) == (True, False)


# ---- SIGKILL at each fault point of a save (pretrain_glm.py) ---------------------------------
ITERS = 5


def _run_args(corpus: Corpus, config: Path, log: Path, ckpt: Path) -> list[str]:
    checkpoints = ["--save", str(ckpt), "--load", str(ckpt), "--save-interval", "2"]
    return pretrain_args(corpus, config, log, iters=ITERS, bert_prob=0.5, extra=checkpoints)


def _losses(log: Path) -> dict[int, str]:
    return {r["step"]: r["loss_hex"] for r in read_log(log)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, glm_corpus: Corpus) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("straight")
    config = write_ds_config(tmp / "ds.json", train_batch=4, micro=4)
    log = tmp / "log.jsonl"
    result = launch(1, _run_args(glm_corpus, config, log, tmp / "ckpt"), log_dir=tmp)
    assert result.ok, result.describe()
    return {"config": config, "losses": _losses(log)}


@pytest.mark.parametrize(
    "point",
    ["before_data", "during_data", "after_data", "before_publish", "after_publish"],
)
def test_sigkill_during_a_save(
    point: str, straight: dict[str, Any], glm_corpus: Corpus, tmp_path: Path
) -> None:
    ckpt, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    command = _run_args(glm_corpus, straight["config"], log, ckpt)
    fault = {"MEGATRON_GLM_FAULT": f"save.{point}:kill@iteration=4"}
    killed = launch(1, command, log_dir=tmp_path, env=fault)
    assert killed.returncodes == [-9], killed.describe()
    # killed by the fault, not by the launcher's timeout: it logged 1-4, then died saving 4
    assert [r["step"] for r in read_log(log)] == [1, 2, 3, 4], killed.describe()
    published = point == "after_publish"
    ref = checkpoint_to_resume(ckpt)  # verifies every digest: the files are bit for bit as saved
    assert ref is not None and ref.iteration == (4 if published else 2)
    assert (ckpt / LATEST_FILE).read_text() == str(ref.iteration)
    assert verify_checkpoint(find_latest_checkpoint(ckpt)).iteration == ref.iteration
    if not published and (ckpt / "4").exists():
        assert not (ckpt / "4" / COMPLETE_MARKER).exists()

    resumed = launch(1, command, log_dir=tmp_path)
    assert resumed.ok, resumed.describe()
    assert f"resumed from {ckpt / str(ref.iteration)}" in resumed.outputs[0]
    again = {r["step"]: r["loss_hex"] for r in read_log(log)[4:]}
    assert sorted(again) == list(range(ref.iteration + 1, ITERS + 1))
    assert again == {s: straight["losses"][s] for s in again}
    assert checkpoint_to_resume(ckpt).iteration == ITERS
    assert not list(ckpt.rglob(".*.tmp")), os.listdir(ckpt)


def test_resume_refuses_another_model_and_a_damaged_file(
    straight: dict[str, Any], glm_corpus: Corpus, tmp_path: Path
) -> None:
    """The issue's cases through the command line: --num-attention-heads 8 on a 4-head checkpoint,
    a flipped byte in the fp32 weights; then --load-fallback."""
    ckpt, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    command = _run_args(glm_corpus, straight["config"], log, ckpt)
    first = launch(1, [*command, "--exit-interval", "4"], log_dir=tmp_path)
    assert first.ok, first.describe()
    assert find_latest_checkpoint(ckpt).iteration == 4

    heads = launch(1, [*command, "--num-attention-heads", "8"], log_dir=tmp_path)
    assert heads.returncodes == [2], heads.describe()
    assert "num_attention_heads is 4, the given model config says 8" in heads.outputs[0]

    weights = ckpt / "4" / MODEL_FILE
    _flip_byte(weights, len(weights.read_bytes()) // 2)
    damaged = launch(1, command, log_dir=tmp_path)
    assert damaged.returncodes == [2], damaged.describe()
    assert f"{weights}: SHA-256 differs" in damaged.outputs[0]
    assert "Traceback" not in damaged.outputs[0]

    fallback = launch(1, [*command, "--load-fallback"], log_dir=tmp_path)
    assert fallback.ok, fallback.describe()
    assert "--load-fallback: resuming checkpoint 2" in fallback.outputs[0]
    resumed = {r["step"]: r["loss_hex"] for r in read_log(log)[4:]}
    assert resumed == {s: straight["losses"][s] for s in range(3, ITERS + 1)}
