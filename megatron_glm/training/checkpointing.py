"""Checkpoints that are either complete or invisible, verified before they are trusted, exact resume.

Layout (docs/checkpoints.md)::

    <save>/latest                            tag of the newest COMPLETE checkpoint (DeepSpeed's name)
    <save>/latest_checkpointed_iteration.txt the same iteration (Megatron's / the official GLM's name)
    <save>/<iteration>/                      one tag per saved iteration
        mp_rank_XX_model_states.pt ...       DeepSpeed's files (layer_*, zero_pp_rank_* ...)
        rng_state_rank00000.pt ...           every rank's RNG streams (weights_only-loadable)
        megatron_glm_meta.json               iteration, consumed samples, config, versions
        layout_free/                         what a resume on another layout reads (reshard.py)
        COMPLETE                             the manifest (manifest.py), written last
        KEEP                                 optional: pruning never deletes this checkpoint

Publishing protocol: every rank writes its files into the tag directory, all ranks meet at a
barrier, the ranks hash a share of the files each, then rank 0 writes the manifest ``COMPLETE``
and atomically replaces ``latest`` (temp file + rename). DeepSpeed's own ``latest`` is disabled. A
save that dies before the manifest leaves a tag directory without ``COMPLETE`` and ``latest``
still naming the previous checkpoint; ``find_latest_checkpoint`` skips such directories, so
resuming needs no cleanup. The fault points ``save.*`` (faults.py) sit between these steps.

Resume (``checkpoint_to_resume``, rank 0): the pointer is validated (a plain tag naming a
directory inside ``--load``), the checkpoint verified against its manifest (sizes, SHA-256 unless
skipped, no unlisted file, no pickled global beyond plain data, iteration and consumed samples
consistent), its architecture compared with the run's; with ``fallback`` the newest older
checkpoint that verifies is taken instead of failing. Every file is then read without running
code: DeepSpeed's through ``checkpoint_engine.WeightsOnlyCheckpointEngine``, ours with
``weights_only=True``, safetensors or JSON.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.atomic_files import atomic_write_text, fsync_dir, replacing
from megatron_glm.config import GLMConfig
from megatron_glm.conversion.canonical import CheckpointError, config_problems
from megatron_glm.conversion.files import read_json_object, weights_only_load
from megatron_glm.integrity import record_files
from megatron_glm.training.faults import fault_point
from megatron_glm.training.manifest import (
    KEEP_MARKER,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    Manifest,
    checkpoint_files,
    checkpoint_problems,
    model_fingerprint,
)

logger = logging.getLogger(__name__)

LATEST_FILE = "latest"
LATEST_ITERATION_FILE = "latest_checkpointed_iteration.txt"
COMPLETE_MARKER = MANIFEST_FILE
META_FILE = "megatron_glm_meta.json"
FORMAT_VERSION = MANIFEST_FORMAT
# what a pointer file may hold: one plain directory name (our tags are iteration numbers)
_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def rng_file_name(rank: int) -> str:
    return f"rng_state_rank{rank:05d}.pt"


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with replacing(path) as tmp:
        torch.save(obj, tmp)


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


def _inside(root: Path, path: Path) -> bool:
    """``path`` is a directory strictly inside ``root`` once links are resolved."""
    resolved, base = path.resolve(), root.resolve()
    return resolved != base and resolved.is_relative_to(base) and resolved.is_dir()


def _iteration_tags(save_dir: Path) -> list[tuple[int, Path]]:
    out = []
    if not save_dir.is_dir():
        return out
    for child in save_dir.iterdir():
        if child.name.isdigit() and _inside(save_dir, child):
            out.append((int(child.name), child))
    return sorted(out)


@dataclass(frozen=True)
class CheckpointRef:
    tag: str
    iteration: int
    path: Path


def _pointer_tag(root: Path) -> str | None:
    """The tag the pointer files name, validated: a small file holding one plain directory name
    that is a directory inside ``root``. ``latest`` wins over ``latest_checkpointed_iteration.txt``
    when both are valid and differ. Anything else is ignored with a warning (``None``)."""
    tags = []
    for name in (LATEST_FILE, LATEST_ITERATION_FILE):
        path = root / name
        if not path.exists():
            continue
        raw, tag = b"", ""
        try:
            raw = path.read_bytes()[:65] if path.is_file() else b""
            tag = raw.decode("ascii").strip()
        except (OSError, UnicodeDecodeError):
            pass
        if not _TAG_RE.fullmatch(tag) or not _inside(root, root / tag):
            logger.warning(
                "%s does not name a checkpoint directory inside %s (it holds %r): ignored",
                path,
                root,
                raw[:64] if path.is_file() else "it is not a file",
            )
            continue
        tags.append(tag)
    if len(set(tags)) > 1:
        logger.warning(
            "%s and %s disagree (%s); using %s",
            LATEST_FILE,
            LATEST_ITERATION_FILE,
            ", ".join(tags),
            tags[0],
        )
    return tags[0] if tags else None


def _complete_checkpoints(load_dir: str | Path | None) -> list[CheckpointRef]:
    """The complete checkpoints under ``load_dir`` a resume may take, best first: the one the
    pointer names (when it is complete), then every complete one older than it, newest first.
    Without a usable pointer, every complete one, newest first, with a warning when the pointer
    was there but named an incomplete checkpoint."""
    if not load_dir:
        return []
    root = Path(load_dir)
    complete = [(it, path) for it, path in _iteration_tags(root) if is_complete(path)]
    tag = _pointer_tag(root)
    iteration = None if tag is None else _tag_iteration(root / tag, tag)
    if tag is not None and iteration is not None and is_complete(root / tag):
        first = CheckpointRef(tag, iteration, root / tag)
        older = [(it, p) for it, p in complete if it < first.iteration and p.name != tag]
        return [first] + [CheckpointRef(p.name, it, p) for it, p in reversed(older)]
    if tag is not None:
        logger.warning(
            "%s names %r, which is not a complete checkpoint; searching %s",
            root / LATEST_FILE,
            tag,
            root,
        )
    return [CheckpointRef(p.name, it, p) for it, p in reversed(complete)]


def find_latest_checkpoint(load_dir: str | Path | None) -> CheckpointRef | None:
    """The newest complete checkpoint under ``load_dir``; ``None`` for a fresh start.

    ``latest`` is trusted when it names a complete checkpoint directory inside ``load_dir``;
    otherwise (a save that died, a hand-edited file) the newest directory with a ``COMPLETE``
    manifest wins, with a warning. Nothing is verified here (``checkpoint_to_resume`` does).
    """
    candidates = _complete_checkpoints(load_dir)
    return candidates[0] if candidates else None


class LoadDirError(ValueError):
    """``--load`` names a directory that holds something, but no complete checkpoint of ours that
    verifies (or fits this run's model)."""


def verify_checkpoint(ref: CheckpointRef, *, hashes: bool = True) -> Manifest:
    """Check ``ref`` against its manifest (``manifest.checkpoint_problems``) and the manifest
    against the metadata: iteration (also the tag's), consumed samples, model fingerprint; the
    layout-free state's iteration when it has one. ``CheckpointError`` with every problem, each
    naming its file."""
    manifest = Manifest.read(ref.path)
    where = ref.path / COMPLETE_MARKER
    problems = checkpoint_problems(ref.path, manifest, hashes=hashes)
    if ref.tag.isdigit() and int(ref.tag) != manifest.iteration:
        problems.append(f"{where}: iteration {manifest.iteration}, the directory is {ref.tag}")
    if META_FILE not in manifest.files:
        problems.append(f"{where}: does not list {META_FILE}")
    if problems:
        raise CheckpointError(problems)
    meta = read_metadata(ref.path)
    said = {META_FILE: (meta.get("iteration"), meta.get("consumed_samples"))}
    from megatron_glm.training.reshard import LAYOUT_FREE_DIR, STATE_FILE, read_state

    if f"{LAYOUT_FREE_DIR}/{STATE_FILE}" in manifest.files:
        state = read_state(ref.path) or {}
        said[f"{LAYOUT_FREE_DIR}/{STATE_FILE}"] = (
            state.get("iteration"),
            state.get("consumed_samples"),
        )
    for name, (iteration, consumed) in said.items():
        if (iteration, consumed) != (manifest.iteration, manifest.consumed_samples):
            problems.append(
                f"{ref.path / name}: iteration {iteration}, {consumed} consumed samples; the "
                f"manifest says {manifest.iteration}, {manifest.consumed_samples}"
            )
    model = _config_section(meta, "model")
    if manifest.model_fingerprint is not None and (
        not isinstance(model, dict)
        or _fingerprint(model, ref.path / META_FILE) != manifest.model_fingerprint
    ):
        problems.append(
            f"{ref.path / META_FILE}: its model config is not the one the manifest fingerprints"
        )
    if problems:
        raise CheckpointError(problems)
    return manifest


def _config_section(meta: dict[str, Any], key: str) -> dict[str, Any] | None:
    """``meta["config"][key]`` when both are objects, else None."""
    config = meta.get("config")
    section = config.get(key) if isinstance(config, dict) else None
    return section if isinstance(section, dict) else None


def _fingerprint(model: dict[str, Any], origin: Path) -> str:
    try:
        return model_fingerprint(model)
    except (TypeError, ValueError) as err:
        raise CheckpointError([f"{origin}: invalid model config ({err})"]) from None


def checkpoint_to_resume(
    load_dir: str | Path | None,
    *,
    ignore: tuple[str | Path, ...] = (),
    model: GLMConfig | None = None,
    hashes: bool = True,
    fallback: bool = False,
) -> CheckpointRef | None:
    """What ``--load load_dir`` resumes: the newest complete checkpoint that verifies
    (``verify_checkpoint``; SHA-256 digests when ``hashes``), or ``None`` for a fresh start when
    the directory is missing or empty. Anything else is a ``LoadDirError`` saying what the
    directory holds: a run must never silently start over next to weights it was meant to
    continue (an official GLM checkpoint, a save that was killed before its first ``COMPLETE``),
    nor resume damaged state.

    A checkpoint that fails verification is an error naming each bad file; with ``fallback`` the
    next older complete checkpoint is tried instead (logged), down to the oldest. ``model``: this
    run's model; a checkpoint of another architecture is refused, listing every differing field.

    ``ignore``: paths the run itself writes and that may sit in ``load_dir`` before the first
    checkpoint does (its ``--log-json`` file, its ``--tensorboard-dir``); they do not make the
    directory non-empty.
    """
    if not load_dir:
        return None
    root = Path(load_dir)
    candidates = _complete_checkpoints(root)
    if candidates:
        return _verified(root, candidates, model=model, hashes=hashes, fallback=fallback)
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


def _verified(
    root: Path,
    candidates: list[CheckpointRef],
    *,
    model: GLMConfig | None,
    hashes: bool,
    fallback: bool,
) -> CheckpointRef:
    """The first of ``candidates`` that verifies (only the first without ``fallback``)."""
    failed: list[tuple[CheckpointRef, CheckpointError]] = []
    for ref in candidates if fallback else candidates[:1]:
        try:
            try:
                verify_checkpoint(ref, hashes=hashes)
            except CheckpointError:
                raise
            except Exception as err:  # whatever a hostile file provokes: rank 0 must not die alone
                raise CheckpointError([f"{ref.path}: cannot be verified ({err!r})"]) from err
            _refuse_weights_only(root, ref)
        except CheckpointError as err:
            _refuse_weights_only(root, ref)  # its marker is no manifest: say what it is instead
            failed.append((ref, err))
            if fallback:
                logger.warning(
                    "--load-fallback: checkpoint %s fails verification, trying an older one:\n  - %s",
                    ref.path,
                    "\n  - ".join(err.problems),
                )
            continue
        if failed:
            logger.warning(
                "--load-fallback: resuming checkpoint %d (%s) instead of %s, which failed "
                "verification",
                ref.iteration,
                ref.path,
                ", ".join(str(r.iteration) for r, _ in failed),
            )
        _check_model(ref, model)
        return ref
    lines = [f"  - {problem}" for _, err in failed for problem in err.problems]
    if fallback:
        head = (
            f"--load {root}: no complete checkpoint verifies (--load-fallback tried {len(failed)}):"
        )
        advice = ""
    else:
        ref = failed[0][0]
        head = f"--load {root}: checkpoint {ref.iteration} ({ref.path}) fails verification:"
        older = len(candidates) - 1
        advice = (
            f"\n{older} older complete checkpoint(s) exist: --load-fallback resumes the newest "
            "of them that verifies"
            if older
            else ""
        )
    raise LoadDirError("\n".join([head, *lines]) + advice)


def _refuse_weights_only(root: Path, ref: CheckpointRef) -> None:
    try:
        weights_only = read_metadata(ref.path).get("weights_only")
    except CheckpointError:
        return
    if weights_only:
        raise LoadDirError(
            f"--load {root}: checkpoint {ref.path} holds weights only (written by "
            "tools/convert_checkpoint.py: no optimizer, LR schedule or data position), so "
            f"there is nothing to resume; start from it with --load-pretrained {root}"
        )


def _check_model(ref: CheckpointRef, model: GLMConfig | None) -> None:
    """``LoadDirError`` listing every architecture field where ``ref``'s model is not ``model``."""
    if model is None:
        return
    meta_path = ref.path / META_FILE
    saved = _config_section(read_metadata(ref.path), "model") or {}
    try:
        saved_config = GLMConfig(**saved)
    except (TypeError, ValueError) as err:
        raise LoadDirError(f"{meta_path}: invalid model config ({err})") from None
    problems = config_problems(saved_config, model, str(meta_path))
    if problems:
        raise LoadDirError(
            "\n".join(
                [
                    f"--load {ref.path.parent}: checkpoint {ref.iteration} was trained with "
                    "another model, so it cannot be resumed with this one (pass the "
                    "checkpoint's model flags, or --load another directory):",
                    *(f"  - {problem}" for problem in problems),
                ]
            )
        )


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


def _tag_iteration(path: Path, tag: str) -> int | None:
    """The iteration of tag directory ``path``: the tag when it is a number, else the metadata's
    (``None`` when that does not say)."""
    if tag.isdigit():
        return int(tag)
    try:
        iteration = read_metadata(path).get("iteration")
    except CheckpointError:
        return None
    return iteration if isinstance(iteration, int) else None


def read_metadata(tag_dir: str | Path) -> dict[str, Any]:
    """``megatron_glm_meta.json`` of ``tag_dir``; ``CheckpointError`` naming it when it is missing
    or not a JSON object."""
    return read_json_object(Path(tag_dir) / META_FILE)


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
    ``keep_last_k``: then prune (``prune_checkpoints``).
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
            # manifest goes first so a crash here cannot leave a complete-looking, half-replaced
            # directory.
            (tag_dir / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(tag_dir)
    _barrier()

    fault_point("save.before_data", rank=rank, iteration=iteration)
    client_state = {"iteration": iteration, "consumed_samples": consumed_samples}
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    fault_point("save.during_data", rank=rank, iteration=iteration)
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
    fault_point("save.after_data", rank=rank, iteration=iteration)

    _barrier()  # every rank's files are on disk
    fault_point("save.before_publish", rank=rank, iteration=iteration)
    records = _record_files(tag_dir, rank, world_size)
    if rank == 0:
        fsync_dir(tag_dir)
        manifest = Manifest(
            iteration=iteration,
            consumed_samples=consumed_samples,
            world_size=world_size,
            layout=_layout(engine, config),
            model_fingerprint=model_fingerprint(config["model"]) if "model" in config else None,
            files=records,
        )
        atomic_write_text(tag_dir / COMPLETE_MARKER, manifest.to_json())
        atomic_write_text(root / LATEST_FILE, tag)
        atomic_write_text(root / LATEST_ITERATION_FILE, tag)
        logger.info(
            "saved checkpoint %s (iteration %d, %d samples consumed, %d files)",
            tag_dir,
            iteration,
            consumed_samples,
            len(records),
        )
    _barrier()
    fault_point("save.after_publish", rank=rank, iteration=iteration)
    if rank == 0 and keep_last_k is not None:
        prune_checkpoints(root, keep_last_k)
    _barrier()
    return tag_dir


def _record_files(tag_dir: Path, rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file of ``tag_dir``, each rank hashing a share; rank 0 lists the
    files (one view of the file system) and gets every record back (the others get ``{}``)."""
    names = [checkpoint_files(tag_dir) if rank == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(names, src=0)
    share = record_files(tag_dir, names[0][rank::world_size])
    if world_size == 1:
        return share
    shares: list[Any] = [None] * world_size
    dist.all_gather_object(shares, share)
    return {name: entry for part in shares for name, entry in part.items()} if rank == 0 else {}


def _layout(engine: Any, config: dict[str, Any]) -> dict[str, Any] | None:
    from megatron_glm.training.reshard import engine_layout

    training = config.get("training", {})
    layout = engine_layout(
        engine,
        int(training.get("tensor_model_parallel_size", 1)),
        int(training.get("pipeline_model_parallel_size", 1)),
    )
    return None if layout is None else asdict(layout)


def protect_checkpoint(save_dir: str | Path, reason: str) -> Path | None:
    """Keep the newest complete checkpoint under ``save_dir`` from pruning, for good: a ``KEEP``
    file holding ``reason`` goes into its directory (``prune_checkpoints`` never deletes a
    directory that has one; delete the file to release it). For the loop, on rank 0, when it stops
    or warns because training went wrong: the last checkpoint from before that must outlive
    ``--keep-last-k``. Returns the directory marked, ``None`` when there is none."""
    ref = find_latest_checkpoint(save_dir)
    if ref is None:
        return None
    atomic_write_text(ref.path / KEEP_MARKER, reason.rstrip("\n") + "\n")
    logger.warning("checkpoint %s is kept from pruning: %s", ref.path, reason)
    return ref.path


def prune_checkpoints(save_dir: str | Path, keep_last_k: int) -> list[Path]:
    """Delete all but the newest ``keep_last_k`` complete checkpoints, and incomplete directories
    older than the newest complete one (dead saves). A checkpoint with a ``KEEP`` file
    (``protect_checkpoint``) is never deleted and does not count towards ``keep_last_k``. Returns
    what was removed."""
    root = Path(save_dir)
    tags = _iteration_tags(root)
    complete = [(it, p) for it, p in tags if is_complete(p)]
    if not complete:
        return []
    newest = complete[-1][0]
    protected = {p for _, p in complete if (p / KEEP_MARKER).exists()}
    unprotected = [p for _, p in complete if p not in protected]
    keep = protected | set(unprotected[-keep_last_k:])
    removed = []
    for iteration, path in tags:
        stale_incomplete = not is_complete(path) and iteration < newest
        if (is_complete(path) and path not in keep) or stale_incomplete:
            # manifest first: an interrupted delete leaves an incomplete (ignored) directory
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
    Every file is read without running code (``checkpoint_engine``); a file that cannot be read
    is a ``CheckpointError`` naming it. ``checkpoint_to_resume`` verified ``ref`` before.

    ``layout`` = this run's (tensor, pipeline) parallel sizes. DeepSpeed's files are per
    model-parallel rank and ZeRO partition: they load when the tensor, pipeline and data parallel
    sizes, the ZeRO stage and the precision are the checkpoint's. Otherwise the checkpoint's
    layout-free state is resharded into ``engine`` (reshard.py); the RNG streams returned then
    are fresh ones for the new ranks. ZeRO 3 without the optimizer state also loads from the
    layout-free state: DeepSpeed would rebuild the weights there with its own unpickling
    ``zero_to_fp32`` reader.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    metadata = read_metadata(ref.path)
    saved = _config_section(metadata, "training") or {}
    saved_layout = (
        saved.get("tensor_model_parallel_size"),
        saved.get("pipeline_model_parallel_size"),
    )
    zero3_weights_only = not load_optimizer and _zero_stage(engine) == 3
    if layout is not None and None not in saved_layout:
        resharded = _load_on_another_layout(
            engine,
            ref,
            metadata,
            tuple(saved_layout),
            layout,
            load_optimizer,
            load_lr_scheduler,
            always=zero3_weights_only,
        )
        if resharded is not None:
            return resharded
    from megatron_glm.training.checkpoint_engine import weights_only_loading

    with weights_only_loading(engine):
        load_path, client_state = engine.load_checkpoint(
            str(ref.path.parent),
            tag=ref.tag,
            load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=load_lr_scheduler,
        )
    if load_path is None:
        raise CheckpointError([f"{ref.path}: DeepSpeed found no model states file of this rank"])
    iteration = int(metadata["iteration"])
    said = (client_state or {}).get("iteration", iteration)
    if said != iteration:
        raise CheckpointError(
            [f"{load_path}: iteration {said}, the checkpoint's {META_FILE} says {iteration}"]
        )
    consumed = int((client_state or {}).get("consumed_samples", metadata["consumed_samples"]))
    rng_states = _read_rng_states(ref, rank, metadata)
    return LoadedCheckpoint(iteration, consumed, rng_states, metadata, ref.path)


def _zero_stage(engine: Any) -> int | None:
    stage = getattr(engine, "zero_optimization_stage", None)
    return None if stage is None else int(stage())


def _read_rng_states(ref: CheckpointRef, rank: int, metadata: dict[str, Any]) -> Any:
    """This rank's RNG streams (weights only), ``None`` when the checkpoint has no file for it."""
    rng_path = ref.path / rng_file_name(rank)
    if rng_path.is_file():
        return weights_only_load(rng_path)
    logger.warning(
        "%s is missing (checkpoint from world size %s): RNG streams start fresh, "
        "the resumed run will not repeat the original bit for bit",
        rng_path,
        metadata.get("world_size"),
    )
    return None


def _load_on_another_layout(
    engine: Any,
    ref: CheckpointRef,
    metadata: dict[str, Any],
    saved_layout: tuple[int, int],
    layout: tuple[int, int],
    load_optimizer: bool,
    load_lr_scheduler: bool,
    *,
    always: bool = False,
) -> LoadedCheckpoint | None:
    """Reshard ``ref`` into ``engine`` when its layout differs from this run's (or ``always``);
    ``None`` when the layouts agree (DeepSpeed's own files then load, bit for bit)."""
    from megatron_glm.training import reshard

    state = reshard.read_state(ref.path)
    current = reshard.engine_layout(engine, layout[0], layout[1])
    same = False
    if state is not None and current is not None:
        same = reshard.saved_layout(state) == current
    elif tuple(saved_layout) == tuple(layout):
        same = True  # nothing finer to compare: trust the tensor/pipeline sizes
    if same and not always:
        return None
    if state is None or current is None:
        why = (
            "ZeRO 3 without the optimizer state (--no-load-optim) is read from the layout-free "
            "state"
            if same
            else f"checkpoint {ref.path} was saved with tensor/pipeline parallel sizes "
            f"{saved_layout[0]}/{saved_layout[1]}, this run uses {layout[0]}/{layout[1]}"
        )
        raise ValueError(
            f"{why}, and {ref.path} has no {reshard.LAYOUT_FREE_DIR}/ state (a checkpoint "
            "written before megatron_glm wrote one, with --no-layout-free-state, or by a run "
            "whose optimizer has no per-parameter access): resume with the same layout"
            + (" and the optimizer state" if same else "")
        )
    seed = int((_config_section(metadata, "training") or {}).get("seed", 1234))
    loaded = reshard.load_layout_free_state(
        engine,
        ref.path,
        state,
        load_optimizer=load_optimizer,
        load_lr_scheduler=load_lr_scheduler,
        current=current,
        seed=seed,
    )
    rank = dist.get_rank() if dist.is_initialized() else 0
    # on the same layout the ranks are the original ones: their own streams continue
    rng_states = _read_rng_states(ref, rank, metadata) if same else loaded.rng_states
    return LoadedCheckpoint(
        loaded.iteration, loaded.consumed_samples, rng_states, metadata, ref.path
    )
