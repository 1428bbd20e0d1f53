"""Checkpoint forms and conversion between them (docs/checkpoints.md#forms).

Every form reads into and writes from a ``CanonicalCheckpoint`` (``canonical.py``): the weights at
TP=1 under the canonical names. ``FORMS`` maps each ``--to`` name of ``tools/convert_checkpoint.py``
to its ``Form``; ``detect_form(path)`` says which form a path holds; ``read_checkpoint(path)``
reads any of them (what ``--load-pretrained`` does).

A form module defines one ``Form`` object with:

- ``name``: the ``--to`` name;
- ``detect(path) -> bool``: whether ``path`` (a file or directory) holds this form; cheap, reads no
  tensors;
- ``read(path, config=None) -> CanonicalCheckpoint``: ``config`` is the architecture when the files
  do not carry it (the official layout), or one to check them against; a mismatch, a missing or
  extra shard, disagreeing TP files or a truncated file is a ``CheckpointError`` naming the file;
- ``write(checkpoint, out, *, tensor_parallel=1, pipeline_parallel=1) -> None``: creates ``out``,
  all or nothing. It first checks the request with ``canonical.check_write_request`` (forms
  without a layout take sizes of 1 only; the weights must fit their config) and raises
  ``CheckpointError`` before touching the disk; then it writes inside
  ``files.staged_directory(out)``, the one place that refuses an ``out`` that exists and is not
  an empty directory, builds the output in a fresh temporary sibling and renames it to ``out``
  only when every file is written (removing it otherwise). Callers, the converter included, pass
  the final path and never stage themselves.

Only tensors are read from foreign files (``files.load_torch_file``: ``torch.load(...,
weights_only=True)``, DeepSpeed's extras as inert stand-ins, so nothing runs; safetensors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from megatron_glm.config import GLMConfig
from megatron_glm.conversion.canonical import CanonicalCheckpoint, CheckpointError


class Form(Protocol):
    name: str

    def detect(self, path: Path) -> bool: ...

    def read(self, path: Path, config: GLMConfig | None = None) -> CanonicalCheckpoint: ...

    def write(
        self,
        checkpoint: CanonicalCheckpoint,
        out: Path,
        *,
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
    ) -> None: ...


def _forms() -> dict[str, Any]:
    # imported on use: the form modules pull in safetensors and DeepSpeed's file layout
    from megatron_glm.conversion import consolidated, deepspeed_form, hf, official

    return {
        form.name: form for form in (deepspeed_form.FORM, consolidated.FORM, official.FORM, hf.FORM)
    }


FORM_NAMES = ("deepspeed", "consolidated", "official", "hf")


def get_form(name: str) -> Form:
    forms = _forms()
    if name not in forms:
        raise ValueError(f"unknown checkpoint form {name!r}; choose from {', '.join(FORM_NAMES)}")
    return forms[name]


def detect_form(path: str | Path) -> str:
    """The name of the form ``path`` holds; ``CheckpointError`` when none matches (saying what
    the path holds)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError([f"{path} does not exist"])
    found = [name for name, form in _forms().items() if form.detect(path)]
    if len(found) == 1:
        return found[0]
    if found:
        raise CheckpointError([f"{path} looks like several checkpoint forms: {', '.join(found)}"])
    listing = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else [path.name]
    raise CheckpointError(
        [
            f"{path} holds no checkpoint form megatron_glm reads ({', '.join(FORM_NAMES)}); "
            f"found: {', '.join(listing) or 'nothing'}"
        ]
    )


def read_checkpoint(path: str | Path, config: GLMConfig | None = None) -> CanonicalCheckpoint:
    """Read a checkpoint of any form into canonical weights (checked against its config)."""
    form = get_form(detect_form(path))
    checkpoint = form.read(Path(path), config)
    checkpoint.check()
    return checkpoint


__all__ = [
    "FORM_NAMES",
    "CanonicalCheckpoint",
    "CheckpointError",
    "Form",
    "detect_form",
    "get_form",
    "read_checkpoint",
]
