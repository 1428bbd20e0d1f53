"""The official GLM checkpoint layout (docs/checkpoints.md#official-glm-checkpoint-layout).

```
<dir>/latest_checkpointed_iteration.txt   the tag: an iteration or the word "release"
<dir>/latest                              DeepSpeed's tracker, the same tag
<dir>/<tag>/mp_rank_{rr:02d}_model_states.pt
```

Each ``mp_rank_XX`` file is a torch pickle of a dict whose ``"module"`` is TP rank ``XX``'s state
dict under the canonical names (docs/model.md#canonical-parameter-names), partitioned as in
docs/model.md#tensor-parallel-partition (the fused Q/K/V rows strided: rank r holds
``[Q_r; K_r; V_r]``). Files saved by the official trainer through DeepSpeed carry more entries
(optimizer, LR scheduler, RNG states, ``mp_world_size``, ...); only ``"module"`` is read.

The files carry no architecture: ``read`` infers layers, hidden size, padded vocabulary, positions
and FFN width from the shapes, takes the head count from the given config or assumes head dim 64
(every released GLM has it) and says so in ``extra["assumed"]``. Our exports add a
``"megatron_glm"`` entry (a JSON string: config, tokenizer, iteration), which the official loaders
ignore and which makes a read of our own export exact.

Loading never runs code from the file (``files.load_torch_file``): a Python object outside
``"module"`` (an argparse ``Namespace``, an RNG state in a DeepSpeed-saved file) is skipped unloaded,
one inside it is an error naming the file.

Shape legend: h hidden, v padded vocab, w TP degree.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_glm.config import GLMConfig
from megatron_glm.conversion.canonical import (
    CanonicalCheckpoint,
    CheckpointError,
    check_write_request,
    config_from_dict,
    fit_problems,
    merge_shards,
    padded_vocab_fields,
    shape_problems,
    shard_shapes,
    shard_state,
)
from megatron_glm.conversion.files import (
    EMBEDDED_KEY,
    MODULE_FILE_RE,
    embedded_json,
    load_torch_file,
    module_file_name,
    module_state,
    own_storage,
    parse_embedded,
    staged_directory,
)
from megatron_glm.training.checkpointing import META_FILE

logger = logging.getLogger(__name__)

__all__ = ["FORM", "OfficialForm", "infer_config"]

TRACKER = "latest_checkpointed_iteration.txt"  # what the official get_checkpoint_iteration reads
DEEPSPEED_TRACKER = "latest"
RELEASE_TAG = "release"
RELEASED_HEAD_DIM = 64
_LAYER_RE = re.compile(r"^transformer\.layers\.(\d+)\.")
# The official trainer's defaults for what the files cannot tell (arguments.py).
_OFFICIAL_DROPOUT = 0.1


# ---------------------------------------------------------------------------------------------
# Finding the files


def _read_tag(file: Path) -> str:
    return file.read_text().strip()


def _shard_files(directory: Path) -> dict[int, Path]:
    found = {}
    for entry in directory.iterdir():
        match = MODULE_FILE_RE.match(entry.name)
        if match and entry.is_file():
            found[int(match.group(1))] = entry
    return found


def _locate(path: Path) -> tuple[Path, dict[int, Path], str | None]:
    """(tag directory, rank -> file, tag) of the official checkpoint at ``path``: the root
    directory (tracker file, or a single ``release``/iteration directory), the tag directory, or
    one ``.pt`` file."""
    if path.is_file():  # read as a TP=1 checkpoint; a rank of a larger one fails the shape check
        return path.parent, {0: path}, None
    if not path.is_dir():
        raise CheckpointError([f"{path} does not exist"])
    trackers = [path / name for name in (TRACKER, DEEPSPEED_TRACKER) if (path / name).is_file()]
    if trackers:
        tags = {tracker.name: _read_tag(tracker) for tracker in trackers}
        tag = tags.get(TRACKER, tags.get(DEEPSPEED_TRACKER, ""))
        if len(set(tags.values())) > 1:
            logger.warning("%s: the tracker files disagree (%s); using %s", path, tags, TRACKER)
        tag_dir = path / tag
        if not tag or not tag_dir.is_dir():
            raise CheckpointError(
                [f"{trackers[0]}: names tag {tag!r}, but {tag_dir} is not a directory"]
            )
        return tag_dir, _shard_files(tag_dir), tag
    direct = _shard_files(path)
    if direct:
        return path, direct, path.name
    candidates = [
        entry
        for entry in path.iterdir()
        if entry.is_dir()
        and (entry.name == RELEASE_TAG or entry.name.isdigit())
        and _shard_files(entry)
    ]
    if not candidates:
        raise CheckpointError(
            [
                f"{path}: no official GLM checkpoint: no {TRACKER}, no mp_rank_XX_model_states.pt "
                "and no release/<iteration> directory holding them"
            ]
        )
    releases = [c for c in candidates if c.name == RELEASE_TAG]
    chosen = releases[0] if releases else max(candidates, key=lambda c: int(c.name))
    if len(candidates) > 1:
        logger.warning(
            "%s: no %s; reading %s of %d tags", path, TRACKER, chosen.name, len(candidates)
        )
    return chosen, _shard_files(chosen), chosen.name


# ---------------------------------------------------------------------------------------------
# Architecture from shapes


def _need(state: Mapping[str, torch.Tensor], name: str, ndim: int, file: Path) -> torch.Tensor:
    tensor = state.get(name)
    if tensor is None or tensor.dim() != ndim:
        got = "missing" if tensor is None else f"shape {tuple(tensor.shape)}"
        raise CheckpointError([f"{file}: {name} is {got}; not a GLM checkpoint?"])
    return tensor


def _shape_facts(state: Mapping[str, torch.Tensor], file: Path) -> dict[str, Any]:
    """What TP rank 0's shard says about the architecture, and the TP degree it was cut for."""
    word = _need(state, "word_embeddings.weight", 2, file)  # [v/w, h]
    positions = _need(state, "transformer.position_embeddings.weight", 2, file)
    qkv = _need(
        state, "transformer.layers.0.attention.query_key_value.weight", 2, file
    )  # [3h/w, h]
    h_to_4h = _need(state, "transformer.layers.0.mlp.dense_h_to_4h.weight", 2, file)
    hidden = int(word.shape[1])
    if (3 * hidden) % qkv.shape[0]:
        raise CheckpointError(
            [
                f"{file}: query_key_value has {qkv.shape[0]} rows, which no TP degree cuts from "
                f"3 * hidden = {3 * hidden}"
            ]
        )
    tp = 3 * hidden // int(qkv.shape[0])
    layers = sorted({int(m.group(1)) for k in state if (m := _LAYER_RE.match(k))})
    return {
        "tensor_parallel": tp,
        "num_layers": layers[-1] + 1,
        "hidden_size": hidden,
        "padded_vocab_size": int(word.shape[0]) * tp,
        "max_sequence_length": int(positions.shape[0]) - 1,
        "ffn_hidden_size": int(h_to_4h.shape[0]) * tp,
        "block_position_encoding": "transformer.block_position_embeddings.weight" in state,
    }


def infer_config(facts: Mapping[str, Any], origin: str) -> tuple[GLMConfig, dict[str, str]]:
    """A ``GLMConfig`` from the shapes alone, and what had to be assumed."""
    hidden = facts["hidden_size"]
    tp = facts["tensor_parallel"]
    heads = hidden // RELEASED_HEAD_DIM
    if hidden % RELEASED_HEAD_DIM or heads % tp:
        raise CheckpointError(
            [
                f"{origin}: the number of attention heads is not stored and head dim "
                f"{RELEASED_HEAD_DIM} does not fit hidden size {hidden} at TP {tp}: pass the model "
                "config (num_attention_heads)"
            ]
        )
    padded = facts["padded_vocab_size"]
    config = GLMConfig(
        num_layers=facts["num_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        **padded_vocab_fields(padded),
        max_sequence_length=facts["max_sequence_length"],
        ffn_hidden_size=facts["ffn_hidden_size"],
        block_position_encoding=facts["block_position_encoding"],
        hidden_dropout=_OFFICIAL_DROPOUT,
        attention_dropout=_OFFICIAL_DROPOUT,
    )
    assumed = {
        "num_attention_heads": f"{heads} (hidden {hidden} / head dim {RELEASED_HEAD_DIM}, as in "
        "every released GLM)",
        "vocab_size": f"{padded}, the embedding rows: the tokenizer's own size is not stored",
        "dropout": f"hidden and attention dropout {_OFFICIAL_DROPOUT}, the official defaults",
    }
    return config, assumed


# ---------------------------------------------------------------------------------------------
# The form


# the architecture fields the shapes tell (_shape_facts), checked against a given config
_SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "padded_vocab_size",
    "max_sequence_length",
    "ffn_hidden_size",
    "block_position_encoding",
)


class OfficialForm:
    name = "official"

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if path.is_file():
            return path.suffix == ".pt" and not (path.parent / META_FILE).exists()
        try:
            tag_dir, files, _ = _locate(path)
        except (CheckpointError, OSError):
            return False
        return bool(files) and not (tag_dir / META_FILE).exists()

    def read(self, path: Path, config: GLMConfig | None = None) -> CanonicalCheckpoint:
        path = Path(path)
        tag_dir, files, tag = _locate(path)
        if (tag_dir / META_FILE).exists():
            raise CheckpointError(
                [
                    f"{tag_dir}: a megatron_glm training checkpoint ({META_FILE}); read it as the "
                    "'deepspeed' form"
                ]
            )
        if 0 not in files:
            raise CheckpointError([f"{tag_dir}: {module_file_name(0)} is missing"])
        raw0 = load_torch_file(files[0], "module")
        state0 = module_state(raw0, files[0])
        facts = _shape_facts(state0, files[0])
        tp = facts["tensor_parallel"]
        self._check_shard_set(tag_dir, files, tp, raw0, path.is_file())

        origin = str(tag_dir if len(files) > 1 or not path.is_file() else files[0])
        embedded = parse_embedded(raw0.get(EMBEDDED_KEY), files[0])
        found = {name: facts[name] for name in _SHAPE_FIELDS}
        assumed: dict[str, str] = {}
        problems: list[str] = []
        if config is not None:
            problems += fit_problems(
                config, found, origin, "the given model config", "the checkpoint"
            )
        elif embedded and isinstance(embedded.get("config"), dict):
            config = config_from_dict(embedded["config"], f"{files[0]}: its {EMBEDDED_KEY} entry")
            problems += fit_problems(
                config, found, origin, f"its {EMBEDDED_KEY} entry", "the checkpoint"
            )
        else:
            config, assumed = infer_config(facts, origin)
            logger.warning(
                "%s: the official files carry no architecture; assumed %s",
                origin,
                "; ".join(f"{k} = {v}" for k, v in assumed.items()),
            )
        if not problems and config.num_attention_heads % tp:
            problems.append(
                f"{origin}: num_attention_heads {config.num_attention_heads} cannot be split over "
                f"the checkpoint's {tp} TP ranks"
            )
        if problems:
            raise CheckpointError(problems)

        ranks = [files[rank] for rank in range(tp)]
        shards = [state0] + [
            module_state(load_torch_file(file, "module"), file) for file in ranks[1:]
        ]
        expected = shard_shapes(config, tp)
        for file, shard in zip(ranks, shards):
            problems += shape_problems(shard, expected, file, tp=tp)
        if problems:
            raise CheckpointError(problems)
        state = merge_shards(shards, config, origin, ranks) if tp > 1 else dict(state0)
        iteration = None
        if tag and tag.isdigit():
            iteration = int(tag)
        elif isinstance(raw0.get("iteration"), int):
            iteration = int(raw0["iteration"])
        extra: dict[str, Any] = {"tensor_parallel": tp, "tag": tag}
        if assumed:
            extra["assumed"] = assumed
        checkpoint = CanonicalCheckpoint(
            config=config,
            state=state,
            iteration=iteration,
            tokenizer=(embedded or {}).get("tokenizer"),
            source=origin,
            extra=extra,
        )
        checkpoint.check()
        return checkpoint

    @staticmethod
    def _check_shard_set(
        tag_dir: Path, files: Mapping[int, Path], tp: int, raw0: Any, single_file: bool
    ) -> None:
        """The files present are exactly ranks 0..tp-1 (tp from the shapes)."""
        saved_tp = raw0.get("mp_world_size") if isinstance(raw0, Mapping) else None
        problems = []
        if isinstance(saved_tp, int) and saved_tp != tp:
            problems.append(
                f"{files[0]}: says mp_world_size {saved_tp}, its tensor shapes say TP {tp}"
            )
        if single_file and tp > 1:
            problems.append(
                f"{files[0]}: holds one TP rank of a TP {tp} checkpoint (its query_key_value "
                f"rows are 1/{tp} of 3 * hidden): pass the directory holding all {tp} files"
            )
        else:
            missing = [module_file_name(r) for r in range(tp) if r not in files]
            extra = [files[r].name for r in sorted(files) if r >= tp]
            if missing:
                problems.append(
                    f"{tag_dir}: the tensor shapes say TP {tp}, but {', '.join(missing)} "
                    f"{'is' if len(missing) == 1 else 'are'} missing"
                )
            if extra:
                problems.append(
                    f"{tag_dir}: the tensor shapes say TP {tp} (ranks 0..{tp - 1}), but "
                    f"{', '.join(extra)} {'is' if len(extra) == 1 else 'are'} there too"
                )
        if problems:
            raise CheckpointError(problems)

    def write(
        self,
        checkpoint: CanonicalCheckpoint,
        out: Path,
        *,
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
        tag: str | None = None,
    ) -> None:
        """Write ``out/<tag>/mp_rank_XX_model_states.pt`` for ``tensor_parallel`` ranks and both
        tracker files. ``tag`` defaults to ``release``, the tag of the released weights, which the
        official ``load_pretrained`` and (non-DeepSpeed) ``load_checkpoint`` read without looking
        for optimizer or RNG state; an iteration number is the other choice."""
        config = checkpoint.config
        tag = RELEASE_TAG if tag is None else str(tag)
        check_write_request(
            checkpoint,
            tensor_parallel,
            pipeline_parallel,
            form=self.name,
            partitioned=True,
            pipelined=False,
            problems=[]
            if tag == RELEASE_TAG or tag.isdigit()
            else [f"tag must be {RELEASE_TAG!r} or an iteration number, got {tag!r}"],
        )
        embedded = embedded_json(checkpoint)
        with staged_directory(out) as staging:
            tag_dir = staging / tag
            tag_dir.mkdir()
            for rank in range(tensor_parallel):
                if tensor_parallel == 1:
                    shard = checkpoint.state
                else:
                    shard = shard_state(checkpoint.state, config, rank, tensor_parallel)
                module = OrderedDict((name, own_storage(shard[name])) for name in checkpoint.state)
                payload: dict[str, Any] = {"module": module, EMBEDDED_KEY: embedded}
                if checkpoint.iteration is not None:
                    payload["iteration"] = int(checkpoint.iteration)
                torch.save(payload, tag_dir / module_file_name(rank))
                del module, shard
            for tracker in (TRACKER, DEEPSPEED_TRACKER):
                (staging / tracker).write_text(f"{tag}\n")
        logger.info(
            "wrote the official GLM layout at TP %d to %s (tag %s)", tensor_parallel, out, tag
        )


FORM = OfficialForm()
