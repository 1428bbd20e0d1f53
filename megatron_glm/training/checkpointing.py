"""Checkpoints that are either complete or invisible, and exact resume.

Layout (docs/checkpoints.md)::

    <save>/latest                            tag of the newest COMPLETE checkpoint (DeepSpeed's name)
    <save>/latest_checkpointed_iteration.txt the same iteration (Megatron's / the official GLM's name)
    <save>/<iteration>/                      one tag per saved iteration
        mp_rank_XX_model_states.pt ...       DeepSpeed's files (layer_*, zero_pp_rank_* ...)
        rng_state_rank00000.pt ...           every rank's RNG streams (weights_only-loadable)
        megatron_glm_meta.json               iteration, consumed samples, config, versions
        COMPLETE                             written last: the save finished on every rank

Publishing protocol: every rank writes its files into the tag directory, all ranks meet at a
barrier, then rank 0 writes ``COMPLETE`` and atomically replaces ``latest`` (temp file + rename).
DeepSpeed's own ``latest`` is disabled. A save that dies before the barrier leaves a tag
directory without ``COMPLETE`` and ``latest`` still naming the previous checkpoint;
``find_latest_checkpoint`` skips such directories, so resuming needs no cleanup.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

LATEST_FILE = "latest"
LATEST_ITERATION_FILE = "latest_checkpointed_iteration.txt"
COMPLETE_MARKER = "COMPLETE"
META_FILE = "megatron_glm_meta.json"
FORMAT_VERSION = 1


def rng_file_name(rank: int) -> str:
    return f"rng_state_rank{rank:05d}.pt"


def _temp_file_for(path: Path) -> tuple[int, str]:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    return fd, tmp


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old or the new content, never a mix."""
    fd, tmp = _temp_file_for(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not supported on every filesystem; rename atomicity is what matters
    finally:
        os.close(fd)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    fd, tmp = _temp_file_for(path)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _versions() -> dict[str, str]:
    import deepspeed

    import megatron_glm

    return {
        "megatron_glm": getattr(megatron_glm, "__version__", "unknown"),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "python": platform.python_version(),
        "format": str(FORMAT_VERSION),
    }


def is_complete(tag_dir: str | Path) -> bool:
    return (Path(tag_dir) / COMPLETE_MARKER).is_file()


def _iteration_tags(save_dir: Path) -> list[tuple[int, Path]]:
    out = []
    if not save_dir.is_dir():
        return out
    for child in save_dir.iterdir():
        if child.is_dir() and child.name.isdigit():
            out.append((int(child.name), child))
    return sorted(out)


@dataclass(frozen=True)
class CheckpointRef:
    tag: str
    iteration: int
    path: Path


def find_latest_checkpoint(load_dir: str | Path | None) -> CheckpointRef | None:
    """The newest complete checkpoint under ``load_dir``; ``None`` for a fresh start.

    ``latest`` is trusted when the directory it names is complete; otherwise (a save that died,
    a hand-edited file) the newest directory with a ``COMPLETE`` marker wins, with a warning.
    """
    if not load_dir:
        return None
    root = Path(load_dir)
    latest = root / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8").strip()
        if tag and is_complete(root / tag):
            return CheckpointRef(tag, _tag_iteration(root / tag, tag), root / tag)
        logger.warning(
            "%s names %r, which is not a complete checkpoint; searching %s", latest, tag, root
        )
    complete = [(it, path) for it, path in _iteration_tags(root) if is_complete(path)]
    if not complete:
        return None
    iteration, path = complete[-1]
    return CheckpointRef(path.name, iteration, path)


def _tag_iteration(path: Path, tag: str) -> int:
    if tag.isdigit():
        return int(tag)
    meta = read_metadata(path)
    return int(meta["iteration"])


def read_metadata(tag_dir: str | Path) -> dict[str, Any]:
    with open(Path(tag_dir) / META_FILE, encoding="utf-8") as f:
        return json.load(f)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    engine: Any,
    save_dir: str | Path,
    iteration: int,
    *,
    consumed_samples: int,
    config: dict[str, Any],
    rng_states: dict[str, Any],
    keep_last_k: int | None = None,
    on_written: Callable[[int, Path], None] | None = None,
) -> Path:
    """Save and publish checkpoint ``iteration``; every rank calls this (it has barriers).

    ``on_written(iteration, tag_dir)`` runs on every rank after its files are written and before
    the publish barrier: the fault-injection seam (an exception there leaves ``latest`` alone).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    root = Path(save_dir)
    tag = str(iteration)
    tag_dir = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():
            # An earlier attempt at this iteration (a crashed save, or a run restarted from an
            # older checkpoint): its files may belong to another layout, so start clean. The
            # marker goes first so a crash here cannot leave a marked, half-replaced directory.
            (tag_dir / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(tag_dir)
    _barrier()

    client_state = {"iteration": iteration, "consumed_samples": consumed_samples}
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    _atomic_torch_save(rng_states, tag_dir / rng_file_name(rank))
    if rank == 0:
        meta = {
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "world_size": world_size,
            "config": config,
            "versions": _versions(),
        }
        _atomic_write_text(tag_dir / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
    if on_written is not None:
        on_written(iteration, tag_dir)

    _barrier()  # every rank's files are on disk
    if rank == 0:
        _fsync_dir(tag_dir)
        _atomic_write_text(
            tag_dir / COMPLETE_MARKER,
            json.dumps({"iteration": iteration, "world_size": world_size}) + "\n",
        )
        _atomic_write_text(root / LATEST_FILE, tag)
        _atomic_write_text(root / LATEST_ITERATION_FILE, tag)
        logger.info(
            "saved checkpoint %s (iteration %d, %d samples consumed)",
            tag_dir,
            iteration,
            consumed_samples,
        )
        if keep_last_k is not None:
            prune_checkpoints(root, keep_last_k)
    _barrier()
    return tag_dir


def prune_checkpoints(save_dir: str | Path, keep_last_k: int) -> list[Path]:
    """Delete all but the newest ``keep_last_k`` complete checkpoints, and incomplete directories
    older than the newest complete one (dead saves). Returns what was removed."""
    root = Path(save_dir)
    tags = _iteration_tags(root)
    complete = [(it, p) for it, p in tags if is_complete(p)]
    if not complete:
        return []
    newest = complete[-1][0]
    keep = {p for _, p in complete[-keep_last_k:]}
    removed = []
    for iteration, path in tags:
        stale_incomplete = not is_complete(path) and iteration < newest
        if (is_complete(path) and path not in keep) or stale_incomplete:
            # marker first: an interrupted delete leaves an incomplete (ignored) directory
            (path / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        logger.info("removed old checkpoints: %s", ", ".join(p.name for p in removed))
    return removed


@dataclass
class LoadedCheckpoint:
    iteration: int
    consumed_samples: int
    rng_states: dict[str, Any] | None  # None: this rank's file is missing (other world size)
    metadata: dict[str, Any]
    path: Path


def load_checkpoint(
    engine: Any,
    ref: CheckpointRef,
    *,
    load_optimizer: bool = True,
    load_lr_scheduler: bool = True,
    layout: tuple[int, int] | None = None,
) -> LoadedCheckpoint:
    """Load ``ref`` into ``engine`` on every rank; RNG states are returned, not applied (the
    caller restores them right before the first step, after set-up has drawn its numbers).

    ``layout`` = this run's (tensor, pipeline) parallel sizes: DeepSpeed's files are per
    model-parallel rank, so a checkpoint of another layout is refused with a clear error.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    metadata = read_metadata(ref.path)
    saved = metadata.get("config", {}).get("training", {})
    saved_layout = (
        saved.get("tensor_model_parallel_size"),
        saved.get("pipeline_model_parallel_size"),
    )
    if layout is not None and None not in saved_layout and tuple(saved_layout) != tuple(layout):
        raise ValueError(
            f"checkpoint {ref.path} was saved with tensor/pipeline parallel sizes "
            f"{saved_layout[0]}/{saved_layout[1]}, this run uses {layout[0]}/{layout[1]}: resume "
            "with the same layout"
        )
    load_path, client_state = engine.load_checkpoint(
        str(ref.path.parent),
        tag=ref.tag,
        load_optimizer_states=load_optimizer,
        load_lr_scheduler_states=load_lr_scheduler,
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {ref.path}")
    rng_path = ref.path / rng_file_name(rank)
    rng_states = None
    if rng_path.is_file():
        rng_states = torch.load(rng_path, weights_only=True)
    else:
        logger.warning(
            "%s is missing (checkpoint from world size %s): RNG streams start fresh, "
            "the resumed run will not repeat the original bit for bit",
            rng_path,
            metadata.get("world_size"),
        )
    consumed = int((client_state or {}).get("consumed_samples", metadata["consumed_samples"]))
    return LoadedCheckpoint(int(metadata["iteration"]), consumed, rng_states, metadata, ref.path)
