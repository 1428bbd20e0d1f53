"""Our training checkpoints as a checkpoint form (docs/checkpoints.md#forms): DeepSpeed's module
files plus ``megatron_glm_meta.json``.

Reading takes the model weights only, at any tensor/pipeline layout:

- PP = 1: ``mp_rank_{tp:02d}_model_states.pt``, the TP rank's state under ``"module"`` with the
  canonical names (ZeRO 0/1/2 keep the whole module there);
- ZeRO 3 (PP = 1): DeepSpeed's ``zero_pp_rank_*_mp_rank_*_model_states.pt`` hold placeholders,
  the weights being partitioned over data parallelism in its optimizer files. They are read from
  the checkpoint's layout-free state instead (``layout_free/``, megatron_glm/training/reshard.py:
  the fp32 master weights of each TP rank under canonical names), cast to the precision the run
  trained in; at the end of an iteration ZeRO 3's module weights are exactly those masters cast.
  ``extra["weights"]`` says so;
- PP > 1: ``layer_{idx:02d}-model_{tp:02d}-model_states.pt``, one file per pipeline layer and TP
  rank, names mapped by ``megatron_glm/training/pipeline.py``'s ``pipeline_location`` (layer 0 the
  embedding, 1..L the transformer layers, L+1 the final LayerNorm, L+2 the tied head, which
  DeepSpeed does not save since its forward is a function of layer 0's table; if a file for it
  exists, its table must equal layer 0's). DeepSpeed names these files by TP rank only, so they
  do not depend on how the layers were split into stages; the ``mp_rank_XX`` files (one per
  pipeline x TP rank) then hold no weights.

TP shards are merged with ``merge_shards``; the config comes from the metadata. Every file is
loaded with ``files.load_torch_file`` (``torch.load(..., weights_only=True)``: DeepSpeed's module
files hold plain metadata, its JSON config, numbers, ``torch.Size``, that it accepts).

Writing produces a checkpoint directory in our layout for any TP/PP (``latest``,
``latest_checkpointed_iteration.txt``, ``<iteration>/`` with DeepSpeed's files as DeepSpeed names
and structures them, ``megatron_glm_meta.json``, ``COMPLETE``). It holds weights only, no
optimizer, LR schedule or RNG state (its metadata says ``"weights_only": true``): it is a start for
``--load-pretrained``; resuming a run needs the run's own training checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_glm.config import GLMConfig
from megatron_glm.config.data import TokenizerSpec
from megatron_glm.conversion.canonical import (
    CanonicalCheckpoint,
    CheckpointError,
    canonical_shapes,
    check_write_request,
    config_from_dict,
    config_problems,
    merge_shards,
    shape_problems,
    shard_shapes,
    shard_state,
)
from megatron_glm.conversion.files import (
    MODULE_FILE_RE,
    load_torch_file,
    module_file_name,
    module_state,
    own_storage,
    read_json_object,
    staged_directory,
    write_json,
)
from megatron_glm.training.checkpointing import (
    COMPLETE_MARKER,
    LATEST_FILE,
    LATEST_ITERATION_FILE,
    META_FILE,
    find_latest_checkpoint,
    is_complete,
    versions,
)
from megatron_glm.training.pipeline import (
    EMBEDDING_LAYER,
    canonical_name,
    head_layer,
    pipeline_location,
)
from megatron_glm.training.reshard import LAYOUT_FREE_DIR, STATE_FILE, read_master_weights

logger = logging.getLogger(__name__)

NAME = "deepspeed"

_LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
_ZERO3_FILE = re.compile(r"^zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")


def layer_file_name(index: int, tp_rank: int) -> str:
    """DeepSpeed's file of pipeline layer ``index`` on TP rank ``tp_rank`` (PP > 1)."""
    return f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"


def _tag_dir(path: Path) -> Path | None:
    """The checkpoint directory ``path`` names: itself (a tag directory with our metadata) or a
    complete checkpoint under a ``--save`` root (a root holding only unfinished saves holds no
    checkpoint). Quiet; reads only small files."""
    if (path / META_FILE).is_file():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8").strip()
        if tag and (path / tag / META_FILE).is_file() and is_complete(path / tag):
            return path / tag
    candidates = [
        child
        for child in path.iterdir()
        if child.is_dir()
        and child.name.isdigit()
        and (child / META_FILE).is_file()
        and is_complete(child)
    ]
    return max(candidates, key=lambda p: int(p.name)) if candidates else None


def resolve_checkpoint_dir(path: Path) -> Path:
    """The tag directory to read: ``path`` itself, or the checkpoint ``--load path`` would resume
    (``latest``, else the newest complete one). ``CheckpointError`` when there is none."""
    if not path.is_dir():
        raise CheckpointError([f"{path}: not a directory"])
    if (path / META_FILE).is_file():
        if not is_complete(path):
            raise CheckpointError(
                [f"{path}: no {COMPLETE_MARKER} marker: the save did not finish on every rank"]
            )
        return path
    ref = find_latest_checkpoint(path)
    if ref is None:
        raise CheckpointError([f"{path}: no complete megatron_glm checkpoint"])
    if not (ref.path / META_FILE).is_file():
        raise CheckpointError([f"{ref.path}: {META_FILE} is missing"])
    return ref.path


def read_meta(tag_dir: Path) -> dict[str, Any]:
    meta_path = tag_dir / META_FILE
    meta = read_json_object(meta_path)
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError([f"{meta_path}: no 'config' object"])
    return meta


def _config_from_meta(meta: Mapping[str, Any], meta_path: Path) -> tuple[GLMConfig, int, int]:
    config = meta["config"]
    model = config_from_dict(config.get("model"), str(meta_path))
    training = config.get("training", {})
    sizes = []
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        value = training.get(key, 1)
        if not isinstance(value, int) or value < 1:
            raise CheckpointError([f"{meta_path}: training.{key} is {value!r}"])
        sizes.append(value)
    return model, sizes[0], sizes[1]


def _tokenizer_from_meta(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    if isinstance(meta.get("tokenizer"), dict):  # written by this module
        return dict(meta["tokenizer"])
    data = meta["config"].get("data") or {}  # a training run: the DataConfig
    if not data.get("tokenizer_type"):
        return None
    # the TokenizerSpec fields DataConfig has by the same name; block_mask_token is derived
    names = [f.name for f in dataclasses.fields(TokenizerSpec) if f.name != "block_mask_token"]
    spec = {name: data.get(name) for name in names}
    spec["fix_command_token"] = bool(spec["fix_command_token"])
    spec["block_mask_token"] = float((data.get("infilling") or {}).get("block_mask_prob", 0)) > 0
    return spec


def _check_layout_files(tag_dir: Path, config: GLMConfig, tp: int, pp: int) -> list[str]:
    """Missing and extra module/layer files for a TP x PP checkpoint."""
    problems = []
    names = {p.name for p in tag_dir.iterdir()}
    if pp == 1:
        wanted = {module_file_name(r) for r in range(tp)}
        present = {n for n in names if MODULE_FILE_RE.match(n)}
        extra_desc = f"TP {tp} has mp_rank_00..{tp - 1:02d}"
    else:
        head = head_layer(config.num_layers)
        wanted = {layer_file_name(i, r) for i in range(head) for r in range(tp)}
        present = {n for n in names if _LAYER_FILE.match(n)}
        wanted |= {layer_file_name(head, r) for r in range(tp)} & present  # optional tied head
        extra_desc = (
            f"TP {tp} x {config.num_layers} layers has layer_00..{head - 1:02d} x "
            f"model_00..{tp - 1:02d}"
        )
    for name in sorted(wanted - present):
        problems.append(f"{tag_dir / name}: missing")
    for name in sorted(present - wanted):
        problems.append(f"{tag_dir / name}: unexpected shard ({extra_desc})")
    return problems


def _is_zero3(tag_dir: Path, pp: int) -> bool:
    """DeepSpeed's ZeRO 3 files instead of its module files: no weights in them."""
    names = [p.name for p in tag_dir.iterdir()]
    return (
        pp == 1
        and not any(MODULE_FILE_RE.match(n) for n in names)
        and any(_ZERO3_FILE.match(n) for n in names)
    )


_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _read_master_weights(
    tag_dir: Path, config: GLMConfig, tp: int
) -> tuple[dict[str, torch.Tensor], str]:
    """A ZeRO 3 checkpoint's weights, from its layout-free fp32 masters: the canonical state in
    the precision the run trained in, and that precision."""
    directory = tag_dir / LAYOUT_FREE_DIR
    if not (directory / STATE_FILE).is_file():
        raise CheckpointError(
            [
                f"{tag_dir}: a ZeRO stage 3 checkpoint (zero_pp_rank_*_mp_rank_*_model_states.pt) "
                f"without {LAYOUT_FREE_DIR}/{STATE_FILE} (saved by an older megatron_glm): its "
                "module files hold no weights (they are partitioned in the optimizer files), "
                "which this reader does not consolidate; resume it at ZeRO 3 with --load and "
                "save it again"
            ]
        )
    shards, layout = read_master_weights(tag_dir, config)
    problems = []
    if layout.tensor != tp:
        problems.append(
            f"{directory / STATE_FILE}: saved at tensor parallel size {layout.tensor}, "
            f"{META_FILE} says {tp}"
        )
    if layout.precision not in _PRECISIONS:
        problems.append(f"{directory / STATE_FILE}: unknown precision {layout.precision!r}")
    expected = shard_shapes(config, tp)
    for rank, shard in enumerate(shards):
        problems += shape_problems(shard, expected, f"{directory} (TP rank {rank})", tp=tp)
    if problems:
        raise CheckpointError(problems)
    merged = merge_shards(shards, config, str(directory))
    dtype = _PRECISIONS[layout.precision]
    return {name: tensor.to(dtype) for name, tensor in merged.items()}, layout.precision


def _read_weights(tag_dir: Path, config: GLMConfig, tp: int, pp: int) -> dict[str, torch.Tensor]:
    problems = _check_layout_files(tag_dir, config, tp, pp)
    if problems:
        raise CheckpointError(problems)
    shapes = canonical_shapes(config)
    expected_shards = shard_shapes(config, tp)
    L = config.num_layers
    # group the canonical names by the file (pipeline layer) that holds them
    groups: dict[int, dict[str, str]] = {}
    for name in shapes:
        index, local = pipeline_location(name, L) if pp > 1 else (EMBEDDING_LAYER, name)
        groups.setdefault(index, {})[name] = local
    head = head_layer(L)
    if pp > 1 and (tag_dir / layer_file_name(head, 0)).is_file():
        groups[head] = {"word_embeddings.weight": "word_embeddings.weight"}
    state: dict[str, torch.Tensor] = {}
    for index, to_local in sorted(groups.items()):
        paths = [
            tag_dir / (layer_file_name(index, r) if pp > 1 else module_file_name(r))
            for r in range(tp)
        ]
        expected = {name: expected_shards[name] for name in to_local}
        shards = []
        for path in paths:
            try:
                # an mp_rank file also holds DeepSpeed's bookkeeping; a layer file is all weights
                local = module_state(load_torch_file(path, "module" if pp == 1 else None), path)
            except CheckpointError as err:  # report every file's problem, not the first
                problems += err.problems
                continue
            rank_state = {canonical_name(index, k, L) if pp > 1 else k: v for k, v in local.items()}
            problems += shape_problems(rank_state, expected, path, tp=tp, shown=to_local)
            shards.append(rank_state)
        if problems or len(shards) != tp:
            continue
        try:
            merged = merge_shards(shards, config, str(paths[0]), paths)
        except CheckpointError as err:
            problems += err.problems
            continue
        if index == head:  # the tied head's copy of the word table
            table = merged["word_embeddings.weight"]
            if not torch.equal(table, state["word_embeddings.weight"]):
                problems.append(
                    f"{paths[0]}: the tied head's word table differs from "
                    f"{layer_file_name(EMBEDDING_LAYER, 0)}'s (first and last stage must agree)"
                )
            continue
        state.update(merged)
    if problems:
        raise CheckpointError(problems)
    return {name: state[name] for name in shapes}  # canonical order


def _deepspeed_version() -> str:
    try:
        import deepspeed

        return str(deepspeed.__version__)
    except ImportError:  # pragma: no cover - a hard dependency of the trainer
        return "unknown"


def _model_states(
    module: dict[str, torch.Tensor] | None, iteration: int, tp: int, pp: int
) -> dict[str, Any]:
    """The dictionary DeepSpeed's ``_save_checkpoint`` writes to ``mp_rank_XX_model_states.pt``
    (same keys), with no optimizer, scheduler or ZeRO state."""
    return {
        "module": module,
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": None,
        "frozen_param_shapes": None,
        "shared_params": None,
        "frozen_param_fragments": None,
        "lr_scheduler": None,
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": 0,
        "global_steps": iteration,
        "global_samples": 0,
        "dp_world_size": 1,
        "mp_world_size": tp * pp,
        "checkpoint_parallel_dimensions": {"pp_degree": pp, "tp_degree": tp},
        "ds_config": {},
        "ds_version": _deepspeed_version(),
        # our client state (megatron_glm.training.checkpointing.save_checkpoint)
        "iteration": iteration,
        "consumed_samples": 0,
    }


class DeepSpeedForm:
    """The ``deepspeed`` form: megatron_glm training checkpoints (any TP/PP)."""

    name = NAME

    def detect(self, path: Path) -> bool:
        path = Path(path)
        try:
            return path.is_dir() and _tag_dir(path) is not None
        except OSError:
            return False

    def read(self, path: Path, config: GLMConfig | None = None) -> CanonicalCheckpoint:
        tag_dir = resolve_checkpoint_dir(Path(path))
        meta = read_meta(tag_dir)
        model, tp, pp = _config_from_meta(meta, tag_dir / META_FILE)
        if config is not None:
            problems = config_problems(model, config, str(tag_dir / META_FILE))
            if problems:
                raise CheckpointError(problems)
        logger.info("reading %s (megatron_glm checkpoint, TP %d x PP %d)", tag_dir, tp, pp)
        extra: dict[str, Any] = {
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
        }
        if _is_zero3(tag_dir, pp):
            state, precision = _read_master_weights(tag_dir, model, tp)
            extra["weights"] = (
                f"ZeRO stage 3: the fp32 master weights of layout_free/, cast to {precision} "
                "(the precision the run trained in)"
            )
            logger.info("%s: %s", tag_dir, extra["weights"])
        else:
            state = _read_weights(tag_dir, model, tp, pp)
        iteration = meta.get("iteration")
        return CanonicalCheckpoint(
            config=model,
            state=state,
            iteration=int(iteration) if isinstance(iteration, int) else None,
            tokenizer=_tokenizer_from_meta(meta),
            source=str(tag_dir.resolve()),
            extra=extra,
        )

    def write(
        self,
        checkpoint: CanonicalCheckpoint,
        out: Path,
        *,
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
    ) -> None:
        tp, pp = tensor_parallel, pipeline_parallel
        config = checkpoint.config
        check_write_request(checkpoint, tp, pp, form=self.name, partitioned=True, pipelined=True)
        iteration = checkpoint.iteration or 0
        L = config.num_layers
        with staged_directory(out) as staging:
            tag_dir = staging / str(iteration)
            tag_dir.mkdir()
            for rank in range(tp):
                shard = shard_state(checkpoint.state, config, rank, tp)
                if pp == 1:
                    torch.save(
                        _model_states(_owned(shard), iteration, tp, pp),
                        tag_dir / module_file_name(rank),
                    )
                    continue
                layers: dict[int, dict[str, torch.Tensor]] = {}
                for name, tensor in shard.items():
                    index, local = pipeline_location(name, L)
                    layers.setdefault(index, {})[local] = tensor
                for index, local_state in sorted(layers.items()):
                    torch.save(_owned(local_state), tag_dir / layer_file_name(index, rank))
            if pp > 1:
                # one per (pipeline, TP) rank, in DeepSpeed's model-parallel rank order pp * tp + tp
                for mp_rank in range(tp * pp):
                    torch.save(
                        _model_states(None, iteration, tp, pp), tag_dir / module_file_name(mp_rank)
                    )
            meta = {
                "iteration": iteration,
                "consumed_samples": 0,
                "world_size": tp * pp,
                "weights_only": True,
                "source": checkpoint.source,
                "config": {
                    "model": config.to_dict(),
                    "training": {
                        "tensor_model_parallel_size": tp,
                        "pipeline_model_parallel_size": pp,
                    },
                },
                "tokenizer": checkpoint.tokenizer,
                "versions": versions(),
            }
            write_json(tag_dir / META_FILE, meta)
            write_json(tag_dir / COMPLETE_MARKER, {"iteration": iteration, "world_size": tp * pp})
            (staging / LATEST_FILE).write_text(str(iteration), encoding="utf-8")
            (staging / LATEST_ITERATION_FILE).write_text(str(iteration), encoding="utf-8")
        logger.info(
            "wrote %s (megatron_glm checkpoint, weights only, TP %d x PP %d)",
            Path(out) / str(iteration),
            tp,
            pp,
        )


def _owned(state: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((name, own_storage(tensor)) for name, tensor in state.items())


FORM = DeepSpeedForm()
