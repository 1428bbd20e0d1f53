"""The manifest of a training checkpoint: written last, checked before anything of it is loaded.

``<tag>/COMPLETE`` is the manifest (JSON). Rank 0 writes it after every rank has written its files
(checkpointing.py), so its presence still means "the save finished everywhere"; its content says
what finished::

    {"format": 2, "iteration": 6, "consumed_samples": 24, "world_size": 2,
     "layout": {"tensor": 1, "pipeline": 2, "data": 1, "zero_stage": 0, "precision": "fp32"},
     "model_fingerprint": "<sha256 of the architecture fields>",
     "files": {"mp_rank_00_model_states.pt": {"size": 281164, "sha256": "..."}, ...}}

``files`` lists every file of the tag directory (sub-directories included, hidden files and the
``KEEP`` marker excluded). The digests are computed in parallel, each rank a share of the files.
``checkpoint_problems`` is the check a resume runs: sizes always, digests unless skipped, no file
the manifest does not list, every ``.pt`` file a torch zip file naming no Python global beyond
those ``weights_only`` loads (read off the pickle opcodes; nothing is unpickled), every
``.safetensors`` header readable.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megatron_glm.config import GLMConfig
from megatron_glm.conversion.canonical import ARCHITECTURE_FIELDS, CheckpointError
from megatron_glm.conversion.files import unsafe_globals
from megatron_glm.integrity import record_problems, regular_file_inside

MANIFEST_FILE = "COMPLETE"
MANIFEST_FORMAT = 2
# A file the run adds to a published checkpoint to keep it from pruning (checkpointing.py); not
# part of the checkpoint's content, so not in the manifest.
KEEP_MARKER = "KEEP"
_MAX_MANIFEST_BYTES = 64 << 20


@dataclass(frozen=True)
class Manifest:
    iteration: int
    consumed_samples: int
    world_size: int
    layout: dict[str, Any] | None
    model_fingerprint: str | None
    files: dict[str, dict[str, Any]]
    format: int = MANIFEST_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def read(cls, tag_dir: str | Path) -> Manifest:
        """The manifest of ``tag_dir``; ``CheckpointError`` naming the file when it is missing,
        unreadable, of another format or malformed."""
        path = Path(tag_dir) / MANIFEST_FILE
        try:
            if path.stat().st_size > _MAX_MANIFEST_BYTES:
                raise ValueError(f"larger than {_MAX_MANIFEST_BYTES} bytes")
            obj = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError([f"{path}: missing"]) from None
        except (OSError, ValueError) as err:
            raise CheckpointError([f"{path}: not a readable manifest ({err})"]) from None
        if not isinstance(obj, dict) or obj.get("format") != MANIFEST_FORMAT:
            found = obj.get("format", "none") if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(
                [
                    f"{path}: manifest format {found}, this version reads {MANIFEST_FORMAT} (a "
                    "checkpoint saved before megatron_glm wrote manifests cannot be verified; "
                    "start from its weights with --load-pretrained)"
                ]
            )
        try:
            manifest = cls(**obj)
            counts = (manifest.iteration, manifest.consumed_samples, manifest.world_size)
            if not all(isinstance(v, int) and v >= 0 for v in counts):
                raise TypeError(f"iteration/consumed_samples/world_size {counts}")
            if not isinstance(manifest.files, dict):
                raise TypeError("'files' is not an object")
        except TypeError as err:
            raise CheckpointError([f"{path}: malformed manifest ({err})"]) from None
        return manifest


def model_fingerprint(model: Mapping[str, Any]) -> str:
    """SHA-256 of the architecture fields (those a checkpoint's weights fix:
    ``canonical.ARCHITECTURE_FIELDS``) of the model config ``model`` (``GLMConfig.to_dict()``)."""
    config = GLMConfig(**model)
    fields = {name: getattr(config, name) for name in ARCHITECTURE_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def checkpoint_files(tag_dir: str | Path) -> list[str]:
    """Every file of ``tag_dir`` a manifest lists: relative ``/`` paths, sorted; hidden files
    (temporary files of a write, a file system's own) and the manifest and ``KEEP`` left out."""
    root = Path(tag_dir)
    names = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        relative = Path(directory).relative_to(root)
        for name in files:
            if name.startswith(".") or (
                relative == Path(".") and name in (MANIFEST_FILE, KEEP_MARKER)
            ):
                continue
            names.append((relative / name).as_posix())
    return sorted(names)


def checkpoint_problems(tag_dir: str | Path, manifest: Manifest, *, hashes: bool) -> list[str]:
    """One message per way ``tag_dir``'s files differ from ``manifest``, naming the file."""
    from megatron_glm.training.checkpoint_engine import deepspeed_globals

    root = Path(tag_dir)
    problems = record_problems(root, manifest.files, hashes=hashes)
    unlisted = sorted(set(checkpoint_files(root)) - set(manifest.files))
    problems += [f"{root / name}: not in the manifest {root / MANIFEST_FILE}" for name in unlisted]
    for name in sorted(manifest.files):
        path = root / name
        if not regular_file_inside(root, name):
            continue  # reported above
        if name.endswith(".safetensors"):
            problems += _safetensors_problems(path)
        if not name.endswith(".pt"):
            continue
        try:
            names = unsafe_globals(path, deepspeed_globals())
        except CheckpointError as err:
            problems += err.problems
            continue
        if names is None:
            problems.append(f"{path}: not a torch zip file (a bare or legacy pickle): not loaded")
        elif names:
            problems.append(
                f"{path}: its pickle names Python globals that are not loaded: "
                f"{', '.join(names[:6])}"
            )
    return problems


def _safetensors_problems(path: Path) -> list[str]:
    """A problem naming ``path`` when its safetensors header does not parse (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own error types
        return [f"{path}: not a readable safetensors file ({type(err).__name__}: {err})"]
    return []
