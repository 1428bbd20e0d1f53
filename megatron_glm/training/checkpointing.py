"""Checkpoints that are either complete or invisible, and exact resume.

Layout (docs/checkpoints.md)::

    <save>/latest                            tag of the newest COMPLETE checkpoint (DeepSpeed's name)
    <save>/latest_checkpointed_iteration.txt the same iteration (Megatron's / the official GLM's name)
    <save>/<iteration>/                      one tag per saved iteration
        mp_rank_XX_model_states.pt ...       DeepSpeed's files (layer_*, zero_pp_rank_* ...)
        rng_state_rank00000.pt ...           every rank's RNG streams (weights_only-loadable)
        megatron_glm_meta.json               iteration, consumed samples, config, versions
        layout_free/                         what a resume on another layout reads (reshard.py)
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


def temp_file_for(path: Path) -> tuple[int, str]:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    return fd, tmp


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old or the new content, never a mix."""
    fd, tmp = temp_file_for(path)
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
    fd, tmp = temp_file_for(path)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def versions() -> dict[str, str]:
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


class LoadDirError(ValueError):
    """``--load`` names a directory that holds something, but no complete checkpoint of ours."""


def checkpoint_to_resume(
    load_dir: str | Path | None, *, ignore: tuple[str | Path, ...] = ()
) -> CheckpointRef | None:
    """What ``--load load_dir`` resumes: the newest complete checkpoint, or ``None`` for a fresh
    start when the directory is missing or empty. Anything else is a ``LoadDirError`` saying what
    the directory holds: a run must never silently start over next to weights it was meant to
    continue (an official GLM checkpoint, a save that was killed before its first ``COMPLETE``).

    ``ignore``: paths the run itself writes and that may sit in ``load_dir`` before the first
    checkpoint does (its ``--log-json`` file, its ``--tensorboard-dir``); they do not make the
    directory non-empty.
    """
    ref = find_latest_checkpoint(load_dir)
    if not load_dir:
        return None
    root = Path(load_dir)
    if ref is not None:
        if read_metadata(ref.path).get("weights_only"):
            raise LoadDirError(
                f"--load {root}: checkpoint {ref.path} holds weights only (written by "
                "tools/convert_checkpoint.py: no optimizer, LR schedule or data position), so "
                f"there is nothing to resume; start from it with --load-pretrained {root}"
            )
        return ref
    if not root.exists():
        return None
    if not root.is_dir():
        raise LoadDirError(f"--load {root} is a file, not a checkpoint directory")
    ignored = {Path(p).resolve() for p in ignore}
    entries = sorted(
        (child for child in root.iterdir() if child.resolve() not in ignored),
        key=lambda p: p.name,
    )
    if not entries:
        return None
    raise LoadDirError(_describe_unresumable(root, entries))


def _describe_unresumable(root: Path, entries: list[Path]) -> str:
    form = _detected_form(root)
    described = None if form is None else FORM_DESCRIPTIONS.get(form, form)
    if (root / META_FILE).is_file():
        return (
            f"--load {root} is one checkpoint of a megatron_glm run (its iteration directory): "
            f"--load takes the directory that holds the run's checkpoints ({root.parent}); to "
            f"start from these weights only, pass --load-pretrained {root}"
        )
    incomplete = [p for p in entries if p.is_dir() and p.name.isdigit() and not is_complete(p)]
    if incomplete and len(incomplete) == len(entries):
        other = (
            f". If they are not ours but a checkpoint in the {described} form, "
            f"start from its weights with --load-pretrained {root}"
            if form is not None
            else ""
        )
        return (
            f"--load {root} holds only incomplete checkpoints (iteration directories "
            f"{', '.join(p.name for p in incomplete)} without a {COMPLETE_MARKER} marker: saves "
            "that were killed before they finished) and no complete one, so there is nothing to "
            "resume. Delete them to start fresh "
            f"(rm -r {' '.join(str(p) for p in incomplete)}), or point --load elsewhere" + other
        )
    if form is not None:
        return (
            f"--load {root} holds a checkpoint in the {described} form, not a "
            "megatron_glm training checkpoint, so there is nothing to resume. To start from its "
            f"weights with a fresh optimizer, LR schedule and data position, pass "
            f"--load-pretrained {root} (and give --load the directory this run saves to); to "
            "change its form, use tools/convert_checkpoint.py (docs/checkpoints.md)"
        )
    found = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:12])
    more = f" and {len(entries) - 12} more" if len(entries) > 12 else ""
    return (
        f"--load {root} holds no complete megatron_glm checkpoint (found: {found}{more}), so "
        "there is nothing to resume; only a missing or empty directory starts a new run. Pass "
        "the directory of a run's checkpoints, an empty or new directory to start fresh, or "
        "--load-pretrained PATH to start from weights in another form (docs/checkpoints.md)"
    )


def _detected_form(root: Path) -> str | None:
    """The checkpoint form (docs/checkpoints.md) ``root`` holds; None when none is readable."""
    from megatron_glm.conversion import CheckpointError, detect_form

    try:
        return detect_form(root)
    except CheckpointError:
        return None


FORM_DESCRIPTIONS = {
    "official": "official GLM",
    "consolidated": "consolidated (config.json + model.safetensors)",
    "hf": "Hugging Face",
    "deepspeed": "megatron_glm",
}


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
    layout_free: bool = True,
) -> Path:
    """Save and publish checkpoint ``iteration``; every rank calls this (it has barriers).

    ``on_written(iteration, tag_dir)`` runs on every rank after its files are written and before
    the publish barrier: the fault-injection seam (an exception there leaves ``latest`` alone).
    ``layout_free``: also write the state a resume on another layout reads (reshard.py).
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
    if layout_free:
        from megatron_glm.training.reshard import save_layout_free_state

        save_layout_free_state(engine, tag_dir, config, iteration, consumed_samples)
    if rank == 0:
        meta = {
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "world_size": world_size,
            "config": config,
            "versions": versions(),
        }
        atomic_write_text(tag_dir / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
    if on_written is not None:
        on_written(iteration, tag_dir)

    _barrier()  # every rank's files are on disk
    if rank == 0:
        _fsync_dir(tag_dir)
        atomic_write_text(
            tag_dir / COMPLETE_MARKER,
            json.dumps({"iteration": iteration, "world_size": world_size}) + "\n",
        )
        atomic_write_text(root / LATEST_FILE, tag)
        atomic_write_text(root / LATEST_ITERATION_FILE, tag)
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

    ``layout`` = this run's (tensor, pipeline) parallel sizes. DeepSpeed's files are per
    model-parallel rank and ZeRO partition: they load when the tensor, pipeline and data parallel
    sizes, the ZeRO stage and the precision are the checkpoint's. Otherwise the checkpoint's
    layout-free state is resharded into ``engine`` (reshard.py); the RNG streams returned then
    are fresh ones for the new ranks.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    metadata = read_metadata(ref.path)
    saved = metadata.get("config", {}).get("training", {})
    saved_layout = (
        saved.get("tensor_model_parallel_size"),
        saved.get("pipeline_model_parallel_size"),
    )
    if layout is not None and None not in saved_layout:
        resharded = _load_on_another_layout(
            engine, ref, metadata, tuple(saved_layout), layout, load_optimizer, load_lr_scheduler
        )
        if resharded is not None:
            return resharded
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


def _load_on_another_layout(
    engine: Any,
    ref: CheckpointRef,
    metadata: dict[str, Any],
    saved_layout: tuple[int, int],
    layout: tuple[int, int],
    load_optimizer: bool,
    load_lr_scheduler: bool,
) -> LoadedCheckpoint | None:
    """Reshard ``ref`` into ``engine`` when its layout differs from this run's; ``None`` when
    the layouts agree (DeepSpeed's own files then load, bit for bit)."""
    from megatron_glm.training import reshard

    state = reshard.read_state(ref.path)
    current = reshard.engine_layout(engine, layout[0], layout[1])
    if state is not None and current is not None:
        if reshard.saved_layout(state) == current:
            return None
    elif tuple(saved_layout) == tuple(layout):
        return None  # nothing finer to compare: trust the tensor/pipeline sizes
    if state is None or current is None:
        raise ValueError(
            f"checkpoint {ref.path} was saved with tensor/pipeline parallel sizes "
            f"{saved_layout[0]}/{saved_layout[1]}, this run uses {layout[0]}/{layout[1]}, and it "
            f"has no {reshard.LAYOUT_FREE_DIR}/ state to reshard (a checkpoint written before "
            "megatron_glm wrote one, or by a run whose optimizer has no per-parameter access): "
            "resume with the same layout"
        )
    seed = int(metadata.get("config", {}).get("training", {}).get("seed", 1234))
    loaded = reshard.load_layout_free_state(
        engine,
        ref.path,
        state,
        load_optimizer=load_optimizer,
        load_lr_scheduler=load_lr_scheduler,
        current=current,
        seed=seed,
    )
    return LoadedCheckpoint(
        loaded.iteration, loaded.consumed_samples, loaded.rng_states, metadata, ref.path
    )
