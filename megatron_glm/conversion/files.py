"""File handling every checkpoint form shares (docs/checkpoints.md#forms).

- Reading: ``load_torch_file`` (a torch pickle, never running code from it), ``module_state``
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
import io
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import types
from collections import OrderedDict
from collections.abc import Iterator, Mapping
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
# Loading torch pickles without running them


class _Refused:
    """Inert stand-in for an object whose class the restricted unpickler does not import: it
    records what the pickle asked for and runs nothing."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Refused:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    # Containers rebuilt from a refused class (a defaultdict, a custom list) get their items here.
    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("values", []).extend(values)

    def __repr__(self) -> str:
        return f"<not loaded: {self.qualname}>"


def _tensor_globals() -> dict[tuple[str, str], Any]:
    """What a pickled state dict of tensors needs (a subset of what ``weights_only`` allows)."""
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "Tensor"): torch.Tensor,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    }
    for module, names in (
        (
            "torch._utils",
            (
                "_rebuild_tensor",
                "_rebuild_tensor_v2",
                "_rebuild_tensor_v3",
                "_rebuild_parameter",
                "_rebuild_parameter_with_state",
            ),
        ),
        ("torch._tensor", ("_rebuild_from_type_v2",)),
    ):
        owner = torch._utils if module == "torch._utils" else torch._tensor
        for name in names:
            if hasattr(owner, name):
                allowed[(module, name)] = getattr(owner, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


def _quarantine_module(refused: set[str]) -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` whose unpickler imports only the tensor allow-list;
    every other global becomes a ``_Refused`` subclass, and its name goes to ``refused``. torch
    resolves its storage classes itself before asking this unpickler."""
    allowed = _tensor_globals()
    stand_ins: dict[str, type[_Refused]] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in allowed:
                return allowed[(module, name)]
            qualname = f"{module}.{name}"
            refused.add(qualname)
            if qualname not in stand_ins:
                stand_ins[qualname] = type("Refused", (_Refused,), {"qualname": qualname})
            return stand_ins[qualname]

    def load(file: Any, **kwargs: Any) -> Any:
        return Unpickler(file, **kwargs).load()

    def loads(data: bytes, **kwargs: Any) -> Any:
        return Unpickler(io.BytesIO(data), **kwargs).load()

    module = types.ModuleType("megatron_glm_restricted_pickle")
    module.Unpickler = Unpickler  # type: ignore[attr-defined]
    module.load = load  # type: ignore[attr-defined]
    module.loads = loads  # type: ignore[attr-defined]
    return module


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
    """Load a torch pickle on the CPU without running anything it contains.

    ``weights_only=True`` first. When that refuses a Python object (an argparse ``Namespace``, a
    numpy RNG state, a loss-scaler object in a DeepSpeed-saved file), the file is loaded again by
    a restricted unpickler that puts an inert stand-in for every class outside the tensor
    allow-list; a stand-in under ``tensors_under`` (``None``: anywhere) is a ``CheckpointError``
    naming the file, one elsewhere is skipped with a warning. A missing, unreadable or truncated
    file is a ``CheckpointError`` naming the file.
    """
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError([f"{file}: missing"]) from None
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        refusal = f"refused {found.group(1)}" if found else type(err).__name__
    except Exception as err:  # torch raises RuntimeError/EOFError/... for damaged files
        text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise CheckpointError(
            [
                f"{file}: cannot be read (truncated or not a torch file): {type(err).__name__}: {text}"
            ]
        ) from err
    refused: set[str] = set()
    try:
        obj = torch.load(
            file, map_location="cpu", weights_only=False, pickle_module=_quarantine_module(refused)
        )
    except Exception as err:
        raise CheckpointError(
            [
                f"{file}: holds pickled Python objects besides tensors, which are not loaded "
                f"(weights_only: {refusal}), and loading only the tensors failed "
                f"({type(err).__name__}: {err}). Re-save only the weights with the code that wrote "
                "it, e.g. torch.save({'module': torch.load(f)['module']}, f) in a trusted "
                "environment"
            ]
        ) from err
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
    if refused:
        logger.warning(
            "%s: skipped pickled Python object(s) outside %r without loading them: %s",
            file,
            tensors_under,
            ", ".join(sorted(refused)[:8]),
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
