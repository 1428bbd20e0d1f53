"""The pivot of every conversion: the model's weights under the canonical (official GLM) names, unpartitioned.

Every checkpoint form (ours at any TP/PP, consolidated, the official GLM's, the Hugging Face
layout) is read into a ``CanonicalCheckpoint`` and written from one, so a conversion between two
forms is read + write, and each form only knows its own files. The names, shapes and the
tensor-parallel partition of each name are those of ``GLMModel`` at TP=1 (docs/model.md#canonical-parameter-names,
docs/model.md#tensor-parallel-partition): they are read off a model built on the meta device, so
they cannot drift from the model code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_glm.config import GLMConfig
from megatron_glm.parallel.utils import gather_tensor_shards, shard_tensor


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: every problem, one per line."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Partition:
    """How a TP rank holds a parameter: its slice along ``dim`` (``stride`` > 1: strided, the
    fused Q/K/V rows), or replicated when a name has no ``Partition``."""

    dim: int
    stride: int = 1


@dataclass
class CanonicalCheckpoint:
    """A model's weights at TP=1 under the canonical names, with the architecture they fit.

    ``tokenizer``: the ``TokenizerSpec`` fields of the tokenizer the weights were trained with,
    when the source says (JSON-able). ``iteration``: the training iteration, when known.
    """

    config: GLMConfig
    state: dict[str, torch.Tensor]
    iteration: int | None = None
    tokenizer: dict[str, Any] | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise ``CheckpointError`` unless ``state`` has exactly the names and shapes of
        ``config``'s model."""
        problems = state_problems(self.state, self.config, self.source or "checkpoint")
        if problems:
            raise CheckpointError(problems)


def _model_layout(config: GLMConfig) -> tuple[tuple[str, tuple[int, ...], Partition | None], ...]:
    return _layout_of(json.dumps(config.to_dict(), sort_keys=True))


@functools.lru_cache(maxsize=16)
def _layout_of(config_json: str) -> tuple[tuple[str, tuple[int, ...], Partition | None], ...]:
    from megatron_glm.model import GLMModel

    with torch.device("meta"):  # shapes and partition attributes only, no memory, no init cost
        model = GLMModel(GLMConfig(**json.loads(config_json)))
    params = dict(model.named_parameters())
    layout = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        param = params.get(name, tensor)
        partition = None
        if getattr(param, "tensor_model_parallel", False):
            partition = Partition(int(param.partition_dim), int(param.partition_stride))
        layout.append((name, tuple(tensor.shape), partition))
    return tuple(layout)


def canonical_names(config: GLMConfig) -> list[str]:
    """The model's state-dict names at TP=1, in order."""
    return [name for name, _, _ in _model_layout(config)]


def canonical_shapes(config: GLMConfig) -> dict[str, tuple[int, ...]]:
    return {name: shape for name, shape, _ in _model_layout(config)}


def partition_of(config: GLMConfig) -> dict[str, Partition | None]:
    """Each canonical name's tensor-parallel partition (``None``: replicated on every TP rank)."""
    return {name: partition for name, _, partition in _model_layout(config)}


def shard_shapes(config: GLMConfig, tp: int) -> dict[str, tuple[int, ...]]:
    """Each canonical name's shape on one of ``tp`` TP ranks."""
    partitions = partition_of(config)
    out = {}
    for name, shape in canonical_shapes(config).items():
        part = partitions[name]
        dims = list(shape)
        if part is not None:
            dims[part.dim] //= tp
        out[name] = tuple(dims)
    return out


def shape_problems(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    origin: str | Path,
    *,
    tp: int = 1,
    shown: Mapping[str, str] | None = None,
) -> list[str]:
    """Messages for missing names, extra names, wrong shapes and non-floating tensors of one
    file's ``state`` against ``expected`` (at ``tp`` TP ranks); ``shown`` maps a canonical name
    to the name the file uses for it (a pipeline layer's local names)."""
    shown = shown or {}
    problems = []
    missing = [shown.get(n, n) for n in expected if n not in state]
    extra = [shown.get(n, n) for n in state if n not in expected]
    if missing:
        problems.append(f"{origin}: missing {len(missing)} tensor(s): {', '.join(missing[:8])}")
    if extra:
        problems.append(f"{origin}: {len(extra)} unexpected tensor(s): {', '.join(extra[:8])}")
    at_tp = f" at TP {tp}" if tp > 1 else ""
    for name, want in expected.items():
        if name not in state:
            continue
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            problems.append(f"{origin}: {shown.get(name, name)} is not a floating-point tensor")
        elif tuple(tensor.shape) != want:
            problems.append(
                f"{origin}: {shown.get(name, name)} has shape {tuple(tensor.shape)}, the model "
                f"config expects {want}{at_tp}"
            )
    return problems


def state_problems(state: Mapping[str, torch.Tensor], config: GLMConfig, origin: str) -> list[str]:
    """Messages for missing names, extra names, wrong shapes and non-floating tensors."""
    return shape_problems(state, canonical_shapes(config), origin)


def shard_state(
    state: Mapping[str, torch.Tensor], config: GLMConfig, tp_rank: int, tp_size: int
) -> dict[str, torch.Tensor]:
    """TP rank ``tp_rank``'s partition of a canonical state (replicated names are copied)."""
    partitions = partition_of(config)
    out = {}
    for name, tensor in state.items():
        part = partitions[name]
        if part is None or tp_size == 1:
            out[name] = tensor.clone()
        else:
            out[name] = shard_tensor(tensor, part.dim, part.stride, tp_rank, tp_size)
    return out


def merge_shards(
    shards: Sequence[Mapping[str, torch.Tensor]],
    config: GLMConfig,
    origin: str,
    files: Sequence[str | Path] | None = None,
) -> dict[str, torch.Tensor]:
    """The canonical state from every TP rank's partition (``shards[r]`` is rank r's). Every rank
    holds each tensor in one dtype, and replicated tensors must agree on every rank; a
    ``CheckpointError`` says which do not, naming ``files[r]`` (rank r's file) when given."""
    partitions = partition_of(config)
    names = list(shards[0])
    problems = []
    for rank, shard in enumerate(shards[1:], start=1):
        if list(shard) != names:
            problems.append(f"{origin}: TP rank {rank} holds other tensors than TP rank 0")
    if problems:
        raise CheckpointError(problems)
    if files is None:
        where, first = [f"{origin}: TP rank {r}" for r in range(len(shards))], "rank 0"
    else:
        where, first = [str(f) for f in files], Path(files[0]).name
    out = {}
    for name in names:
        part = partitions.get(name)
        pieces = [shard[name] for shard in shards]
        for rank, piece in enumerate(pieces[1:], start=1):
            if piece.dtype != pieces[0].dtype:
                problems.append(
                    f"{where[rank]}: {name} is {piece.dtype}, {first} has {pieces[0].dtype}"
                )
            elif part is None and (
                piece.shape != pieces[0].shape or not torch.equal(piece, pieces[0])
            ):
                problems.append(
                    f"{where[rank]}: {name} differs from {first} (replicated: every TP rank "
                    "holds the same values)"
                )
        if part is None or len(shards) == 1:
            out[name] = pieces[0]
        else:
            try:
                out[name] = gather_tensor_shards(pieces, part.dim, part.stride)
            except ValueError as err:
                problems.append(f"{origin}: {name}: {err}")
    if problems:
        raise CheckpointError(problems)
    return out


def cast_state(
    state: Mapping[str, torch.Tensor], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """``state`` in ``dtype`` (``None``: as it is), contiguous, detached, on the CPU."""
    return {
        name: (t if dtype is None else t.to(dtype)).detach().cpu().contiguous()
        for name, t in state.items()
    }


# GLMConfig fields that decide which weights fit (names, shapes, meaning); the others (dropout,
# kernels, recompute, seed) are run-time choices a checkpoint does not fix.
ARCHITECTURE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "ffn_hidden_size",
    "padded_vocab_size",  # only the padded table is in the weights: a tokenizer may use fewer rows
    "max_sequence_length",
    "block_position_encoding",
    "layernorm_epsilon",
)


# GLMConfig fields without a default: a stored config (or a set of flags) lacking one is incomplete
REQUIRED_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(GLMConfig)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)


def config_from_dict(obj: Any, origin: str) -> GLMConfig:
    """``GLMConfig(**obj)`` for a config a checkpoint stores (``origin`` names where);
    ``CheckpointError`` for anything but an object of known fields with valid values."""
    if not isinstance(obj, Mapping):
        raise CheckpointError([f"{origin}: the model config is not a JSON object"])
    unknown = sorted(set(obj) - {f.name for f in dataclasses.fields(GLMConfig)})
    if unknown:
        raise CheckpointError([f"{origin}: unknown GLMConfig field(s): {', '.join(unknown)}"])
    try:
        return GLMConfig(**obj)
    except (TypeError, ValueError) as err:
        raise CheckpointError([f"{origin}: invalid model config: {err}"]) from None


def config_problems(found: GLMConfig, expected: GLMConfig, origin: str) -> list[str]:
    """One message per architecture field where a checkpoint's config (``found``, read from
    ``origin``) differs from the one it is checked against (``expected``: given by the user)."""
    problems = []
    for name in ARCHITECTURE_FIELDS:
        have, want = getattr(found, name), getattr(expected, name)
        if have != want:
            problems.append(f"{origin}: {name} is {have!r}, the given model config says {want!r}")
    return problems


def fit_problems(
    config: GLMConfig, found: Mapping[str, Any], origin: str, what: str, where: str
) -> list[str]:
    """Where ``config`` (described as ``what``: the given model config, our embedded one) does not
    fit what a checkpoint's files say (``found``: field -> value, read from ``where``): a heading
    and one indented line per field."""
    wrong = [
        f"  {name}: {what} says {getattr(config, name)}, {where} has {value}"
        for name, value in found.items()
        if getattr(config, name) != value
    ]
    return [f"{origin}: {what} does not fit the checkpoint:", *wrong] if wrong else []


def padded_vocab_fields(rows: int) -> dict[str, int]:
    """The vocabulary fields of a config read from a file that stores only the padded word table
    (``rows`` rows): the tokenizer's own size is unknown, so the table is taken as it is (padded
    to a multiple of 128 when it is one, else not padded again)."""
    return {"vocab_size": rows, "make_vocab_size_divisible_by": 128 if rows % 128 == 0 else 1}


def check_write_request(
    checkpoint: CanonicalCheckpoint,
    tensor_parallel: int,
    pipeline_parallel: int,
    *,
    form: str,
    partitioned: bool,
    pipelined: bool,
    problems: Sequence[str] = (),
) -> None:
    """What every ``Form.write`` checks before it touches the disk: ``CheckpointError`` listing
    why ``form`` cannot be written at ``tensor_parallel`` x ``pipeline_parallel`` (a form that is
    not ``partitioned`` holds the whole model in one piece; one that is not ``pipelined`` has no
    pipeline stages), together with the form's own ``problems``; then ``checkpoint.check()``."""
    problems = list(problems)
    sizes = {"tensor_parallel": tensor_parallel, "pipeline_parallel": pipeline_parallel}
    bad_sizes = [
        f"{name} must be an integer >= 1, got {size!r}"
        for name, size in sizes.items()
        if not isinstance(size, int) or size < 1
    ]
    if bad_sizes:
        raise CheckpointError([*bad_sizes, *problems])
    config = checkpoint.config
    if not partitioned and tensor_parallel != 1:
        problems.append(
            f"the {form} form holds the whole model unpartitioned (TP = PP = 1): tensor_parallel "
            f"must be 1, got {tensor_parallel}"
        )
    if not pipelined and pipeline_parallel != 1:
        problems.append(
            f"the {form} form has no pipeline stages: pipeline_parallel must be 1, got "
            f"{pipeline_parallel}"
        )
    if partitioned:
        from megatron_glm.model import check_tp_divisibility

        try:
            check_tp_divisibility(config, tensor_parallel)
        except ValueError as err:
            problems.append(str(err))
    if pipelined and pipeline_parallel > config.num_layers:
        problems.append(
            f"pipeline-parallel size {pipeline_parallel} exceeds the {config.num_layers} "
            "transformer layers"
        )
    if problems:
        raise CheckpointError(problems)
    checkpoint.check()
