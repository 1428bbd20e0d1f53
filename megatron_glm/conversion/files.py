"""File handling every checkpoint form shares (docs/checkpoints.md#forms).

- Reading: ``weights_only_load`` and ``load_torch_file`` (a torch file, never running code from
  it: ``weights_only``, foreign objects as inert stand-ins), ``module_state``
  (the model weights of a DeepSpeed-style ``.pt`` file), ``read_safetensors``, ``read_json_object``.
- Writing: ``staged_directory`` (the one place an output directory is checked and created: built
  in a temporary sibling and renamed, so a failed write leaves nothing), ``own_storage``,
  ``write_json``, ``write_safetensors``.
- ``EMBEDDED_KEY``: the JSON entry (config, tokenizer, iteration) our official and Hugging Face
  exports add, which the official and remote code ignore and which makes reading them back exact.

A problem with a file is a ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_glm.conversion.canonical import CanonicalCheckpoint, CheckpointError

logger = logging.getLogger(__name__)

EMBEDDED_KEY = "megatron_glm"
# DeepSpeed's per-model-parallel-rank file; the official GLM trainer saved through DeepSpeed, so
# its layout uses the same name.
MODULE_FILE_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


def module_file_name(mp_rank: int) -> str:
    """DeepSpeed's file of model-parallel rank ``mp_rank`` (the module state at PP = 1)."""
    return f"mp_rank_{mp_rank:02d}_model_states.pt"


# ---------------------------------------------------------------------------------------------
# Our embedded metadata


def embedded_json(checkpoint: CanonicalCheckpoint) -> str:
    """The ``EMBEDDED_KEY`` entry of an export: what the foreign layout cannot say itself."""
    return json.dumps(
        {
            "config": checkpoint.config.to_dict(),
            "tokenizer": checkpoint.tokenizer,
            "iteration": checkpoint.iteration,
        },
        sort_keys=True,
    )


def parse_embedded(raw: Any, origin: str | Path) -> dict[str, Any] | None:
    """The ``EMBEDDED_KEY`` entry ``raw`` as a dict; ``None`` when absent (or nulled, as the
    official change_mp.py does) or unreadable, which is only worth a warning: the files still
    hold the weights."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
    except (TypeError, ValueError) as err:
        logger.warning("%s: ignoring an unreadable %r entry (%s)", origin, EMBEDDED_KEY, err)
        return None


# ---------------------------------------------------------------------------------------------
# Loading torch files without running them


def weights_only_load(
    file: str | Path, *, allowed: Sequence[Any] = (), map_location: Any = "cpu"
) -> Any:
    """``torch.load(file, weights_only=True)``: tensors, containers, numbers and strings, and
    the classes in ``allowed`` (a class, or an ``(object, "module.name")`` pair standing for that
    name), nothing else; no function from the file is called. Any failure (missing, truncated,
    not a torch file, a refused global) is a ``CheckpointError`` naming the file."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(file, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError([f"{file}: missing"]) from None
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"refused {found.group(1)}" if found else _first_line(err)
        raise CheckpointError(
            [f"{file}: holds pickled Python objects besides tensors, which are not loaded ({what})"]
        ) from None
    except Exception as err:  # torch raises RuntimeError/EOFError/MemoryError/... for damaged files
        raise CheckpointError(
            [f"{file}: cannot be read (truncated or not a torch file): {_first_line(err)}"]
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"


def unsafe_globals(file: str | Path, allowed: Sequence[Any] = ()) -> list[str] | None:
    """The globals (``module.name``) the pickle of torch file ``file`` names beyond what
    ``weights_only`` loads and ``allowed``, read off its opcodes without unpickling anything;
    ``None`` for a file that is not a torch zip file (a legacy torch file or a bare pickle).
    ``CheckpointError`` naming the file when it cannot be read."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(file)))
    except FileNotFoundError:
        raise CheckpointError([f"{file}: missing"]) from None
    except ValueError:
        return None  # not a zip file
    except Exception as err:  # a damaged zip archive or pickle
        raise CheckpointError(
            [f"{file}: cannot be read (truncated or not a torch file): {_first_line(err)}"]
        ) from None


class _Refused:
    """Inert stand-in for a class or function a foreign file names outside the tensor types: it
    records what the file asked for and runs nothing."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Refused:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<not loaded: {self.qualname}>"


def _refused_inside(value: Any, depth: int = 0) -> list[str]:
    if isinstance(value, _Refused):
        return [value.qualname]
    if depth > 8:
        return []
    if isinstance(value, Mapping):
        return [q for v in value.values() for q in _refused_inside(v, depth + 1)]
    if isinstance(value, list | tuple):
        return [q for v in value for q in _refused_inside(v, depth + 1)]
    return []


def load_torch_file(file: Path, tensors_under: str | None = None) -> Any:
    """Load a foreign torch file on the CPU without running anything it contains.

    The globals its pickle names are read off the opcodes first (nothing is unpickled); each one
    outside the tensor types becomes an inert stand-in (``_Refused``) registered under that name,
    and the file is then read with ``weights_only=True``. So an argparse ``Namespace``, a numpy
    RNG state or a loss-scaler object in a DeepSpeed-saved file cost nothing, and a payload (a
    pickled call of ``open``, ``subprocess.run`` ...) becomes a stand-in instead of a call. A
    stand-in under ``tensors_under`` (``None``: anywhere) is a ``CheckpointError`` naming the
    file, one elsewhere is skipped with a warning. ``os``/``sys`` globals are refused outright,
    as is any object of a legacy (pre-zip) file. A missing, unreadable or truncated file is a
    ``CheckpointError`` naming the file.
    """
    names = unsafe_globals(file) or []
    stand_ins = [(type("Refused", (_Refused,), {"qualname": name}), name) for name in names]
    obj = weights_only_load(file, allowed=stand_ins)
    inside = obj.get(tensors_under) if tensors_under and isinstance(obj, Mapping) else obj
    bad = sorted(set(_refused_inside(inside)))
    if bad:
        where = f"its {tensors_under!r} entry" if tensors_under else "it"
        raise CheckpointError(
            [
                f"{file}: {where} holds pickled Python objects, not only tensors "
                f"({', '.join(bad[:6])}); they were not loaded and nothing in them ran. Only tensor "
                "files are read: re-save the weights alone from a trusted environment"
            ]
        )
    if names:
        logger.warning(
            "%s: skipped pickled Python object(s) outside %r without loading them: %s",
            file,
            tensors_under,
            ", ".join(names[:8]),
        )
    return obj


def module_state(obj: Any, file: Path) -> dict[str, torch.Tensor]:
    """The state dict a DeepSpeed-style file holds: its ``"module"`` entry (unwrapping a
    ``"module"``/``"model"`` nesting or a ``module.``/``model.`` name prefix left by a wrapper),
    or the file itself when it is a bare dict of tensors (a pipeline layer file)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError([f"{file}: holds a {type(obj).__name__}, not a dict with 'module'"])
    if "module" in obj:
        state = obj["module"]
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        keys = ", ".join(sorted(map(str, obj))[:8])
        raise CheckpointError([f"{file}: no 'module' entry (the model weights); keys: {keys}"])
    while (
        isinstance(state, Mapping)
        and len(state) == 1
        and next(iter(state)) in ("module", "model")
        and isinstance(next(iter(state.values())), Mapping)
    ):
        state = next(iter(state.values()))
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError([f"{file}: 'module' is {type(state).__name__}, not a state dict"])
    for prefix in ("module.", "model."):
        if "word_embeddings.weight" not in state and f"{prefix}word_embeddings.weight" in state:
            state = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            [f"{file}: 'module' entries that are not tensors: {', '.join(not_tensors[:8])}"]
        )
    return {str(k): v.detach() for k, v in state.items()}  # Parameters as plain tensors


def read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (in the file's order) and the metadata of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types (truncated header ...)
        raise CheckpointError(
            [f"{file}: cannot be read (truncated or not safetensors): {type(err).__name__}: {err}"]
        ) from err


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object; ``CheckpointError`` naming it otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError([f"{path}: cannot be read as JSON ({err})"]) from None
    if not isinstance(obj, dict):
        raise CheckpointError([f"{path}: not a JSON object"])
    return obj


# ---------------------------------------------------------------------------------------------
# Writing


def output_problem(out: Path) -> str | None:
    """Why ``out`` cannot receive a checkpoint (``None``: it does not exist or is an empty
    directory)."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        return f"{out} exists and is not a directory"
    if out.is_dir() and any(out.iterdir()):
        return f"{out} exists and is not empty: the output must be a new or an empty directory"
    return None


def _file_mode(mode: int) -> int:
    """``mode`` less the process umask, as ``open`` would create it (tempfile and safetensors
    create 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out`` to write into; it becomes ``out`` when the
    block succeeds and is removed when it fails, so a failed write leaves nothing at ``out``.
    ``out`` must not exist or be an empty directory (``CheckpointError`` otherwise, before
    anything is created)."""
    out = Path(out)
    problem = output_problem(out)
    if problem is not None:
        raise CheckpointError([problem])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
        os.chmod(staging, _file_mode(0o777))
        if out.is_dir():
            out.rmdir()  # still empty (checked above); fails loudly if something appeared
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU, contiguous and alone in its storage: ``torch.save`` writes a view's
    whole storage and safetensors refuses shared storage."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]
) -> None:
    """``tensors`` (each given its own storage) to a safetensors file with the usual
    permissions."""
    from safetensors.torch import save_file

    save_file(
        {name: own_storage(t) for name, t in tensors.items()}, str(path), metadata=dict(metadata)
    )
    os.chmod(path, _file_mode(0o666))
