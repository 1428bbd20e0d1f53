"""The Hugging Face hub layout of THUDM's released ``glm-*`` models (docs/checkpoints.md#hugging-face-layout).

```
<dir>/config.json          the remote-code GLMConfig: the released repositories' keys
<dir>/model.safetensors    written here; read: model.safetensors or pytorch_model.bin, or their
                           sharded variants (*.index.json)
```

The weights are one unpartitioned model under ``"glm." + canonical name`` (the remote code's head
classes hold the base model as ``self.glm``; its ``from_pretrained`` adds or strips that prefix, so
unprefixed files, as saved from its ``GLMModel``, are read too). ``config.json``'s ``vocab_size`` is
the rows of the word table, i.e. our ``padded_vocab_size``; the tokenizer's own size is not in the
file, so a read without our metadata gives ``vocab_size = padded_vocab_size``.

Our exports also store ``{"megatron_glm": JSON}`` (config, tokenizer, iteration) in the safetensors
metadata, so reading our own export back is exact; the remote code ignores it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_glm.config import GLMConfig
from megatron_glm.conversion.canonical import (
    REQUIRED_FIELDS,
    CanonicalCheckpoint,
    CheckpointError,
    canonical_names,
    check_write_request,
    config_from_dict,
    fit_problems,
    padded_vocab_fields,
)
from megatron_glm.conversion.files import (
    EMBEDDED_KEY,
    embedded_json,
    load_torch_file,
    parse_embedded,
    read_json_object,
    read_safetensors,
    staged_directory,
    write_json,
    write_safetensors,
)

logger = logging.getLogger(__name__)

__all__ = ["FORM", "HFForm", "config_from_hf", "hf_config"]

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
PREFIX = "glm."
# The constant part of the released config.json files (THUDM/glm-10b, glm-2b, glm-roberta-large,
# glm-large-chinese, glm-10b-chinese on the Hugging Face hub, as saved by transformers 4.23.1);
# auto_map is glm-10b's.
RELEASED_AUTO_MAP = {
    "AutoConfig": "configuration_glm.GLMConfig",
    "AutoModel": "modeling_glm.GLMModel",
    "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration",
    "AutoModelForMultipleChoice": "modeling_glm.GLMForMultipleChoice",
}
RELEASED_TRANSFORMERS_VERSION = "4.23.1"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_LAYERNORM_EPSILON = 1e-5  # hard-coded in the remote code


def hf_config(config: GLMConfig, name: str, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` of ``config``, with the released repositories' keys. ``CheckpointError``
    when the remote code cannot express the model."""
    problems = []
    if not config.block_position_encoding:
        problems.append(
            "block_position_encoding is False: the remote code then builds a position table of "
            "max_sequence_length rows, ours has max_sequence_length + 1"
        )
    if config.ffn_hidden_size != 4 * config.hidden_size:
        problems.append(
            f"ffn_hidden_size {config.ffn_hidden_size} is not 4 * hidden_size: the remote code "
            "fixes the FFN width at 4h"
        )
    if config.layernorm_epsilon != _LAYERNORM_EPSILON:
        problems.append(
            f"layernorm_epsilon {config.layernorm_epsilon}: the remote code fixes it at "
            f"{_LAYERNORM_EPSILON}"
        )
    if problems:
        raise CheckpointError(["the Hugging Face GLM code cannot hold this model:", *problems])
    return {
        "_name_or_path": name,
        "architectures": ["GLMModel"],
        "attention_dropout_prob": config.attention_dropout,
        "attention_scale": 1.0,
        "auto_map": dict(RELEASED_AUTO_MAP),
        "block_position_encoding": True,
        "checkpoint_activations": config.checkpoint_activations,
        "checkpoint_num_layers": config.checkpoint_num_layers,
        "embedding_dropout_prob": config.hidden_dropout,
        "hidden_size": config.hidden_size,
        "initializer_range": config.init_method_std,
        "max_sequence_length": config.max_sequence_length,
        "model_type": "glm",
        "num_attention_heads": config.num_attention_heads,
        "num_layers": config.num_layers,
        "output_dropout_prob": config.hidden_dropout,
        "output_predict": True,
        "parallel_output": True,
        "pool_token": "cls",
        "relative_encoding": False,
        "spell_func": "lstm",
        "spell_length": None,
        "torch_dtype": _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")),
        "transformers_version": RELEASED_TRANSFORMERS_VERSION,
        "vocab_size": config.padded_vocab_size,
    }


def config_from_hf(cfg: Mapping[str, Any], origin: str) -> GLMConfig:
    """The ``GLMConfig`` of a released-style ``config.json``; ``CheckpointError`` for settings our
    model does not implement."""
    problems = []
    if cfg.get("model_type") != "glm":
        problems.append(f"model_type is {cfg.get('model_type')!r}, not 'glm'")
    # the remote code's GLMConfig has our names for the fields without a default
    missing = [k for k in REQUIRED_FIELDS if not isinstance(cfg.get(k), int)]
    if missing:
        problems.append(f"missing or non-integer {', '.join(missing)}")
    if cfg.get("relative_encoding", False):
        problems.append("relative_encoding is true (Transformer-XL positions): not implemented")
    if not cfg.get("block_position_encoding", True):
        problems.append("block_position_encoding is false: only 2D positions are implemented")
    if float(cfg.get("attention_scale", 1.0)) != 1.0:
        problems.append(f"attention_scale is {cfg.get('attention_scale')}: only 1.0 is implemented")
    if problems:
        raise CheckpointError([f"{origin}: {p}" for p in problems])
    hidden_dropout = float(cfg.get("output_dropout_prob", 0.1))
    if float(cfg.get("embedding_dropout_prob", hidden_dropout)) != hidden_dropout:
        logger.warning(
            "%s: embedding_dropout_prob %s differs from output_dropout_prob %s; megatron_glm has "
            "one hidden_dropout for both and uses %s",
            origin,
            cfg.get("embedding_dropout_prob"),
            hidden_dropout,
            hidden_dropout,
        )
    try:
        return GLMConfig(
            num_layers=int(cfg["num_layers"]),
            hidden_size=int(cfg["hidden_size"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            **padded_vocab_fields(int(cfg["vocab_size"])),  # the word table's rows
            max_sequence_length=int(cfg["max_sequence_length"]),
            hidden_dropout=hidden_dropout,
            attention_dropout=float(cfg.get("attention_dropout_prob", 0.1)),
            init_method_std=float(cfg.get("initializer_range", 0.02)),
            layernorm_epsilon=float(cfg.get("layernorm_epsilon", _LAYERNORM_EPSILON)),
            checkpoint_activations=bool(cfg.get("checkpoint_activations", False)),
            checkpoint_num_layers=int(cfg.get("checkpoint_num_layers", 1)),
        )
    except ValueError as err:
        raise CheckpointError([f"{origin}: {err}"]) from err


# the architecture fields config.json tells, checked against a given or embedded config
_CONFIG_JSON_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "padded_vocab_size",
    "max_sequence_length",
    "ffn_hidden_size",
)


def _weight_files(directory: Path) -> list[Path]:
    """The files holding the weights, safetensors first (as transformers prefers them)."""
    for single, index in (
        (SAFETENSORS_FILE, SAFETENSORS_FILE + ".index.json"),
        (BIN_FILE, BIN_FILE + ".index.json"),
    ):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            try:
                weight_map = json.loads((directory / index).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise CheckpointError([f"{directory / index}: unreadable index ({err})"]) from err
            return [directory / name for name in sorted(set(weight_map.values()))]
    raise CheckpointError(
        [f"{directory}: no {SAFETENSORS_FILE} or {BIN_FILE} (nor a sharded index of either)"]
    )


def _read_weights(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    state: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    problems = []
    for file in files:
        if not file.is_file():
            raise CheckpointError([f"{file}: named by the index but missing"])
        if file.suffix == ".safetensors":
            part, meta = read_safetensors(file)
            metadata.update(meta)
        else:
            part = load_torch_file(file)
            if isinstance(part, Mapping) and "state_dict" in part:
                part = part["state_dict"]
            if not isinstance(part, Mapping) or not all(
                isinstance(v, torch.Tensor) for v in part.values()
            ):
                raise CheckpointError([f"{file}: not a state dict of tensors"])
        for name, tensor in part.items():
            if name in state:
                problems.append(f"{file}: {name} is also in another weight file")
            state[str(name)] = tensor
    if problems:
        raise CheckpointError(problems)
    return state, metadata


class HFForm:
    name = "hf"

    def detect(self, path: Path) -> bool:
        path = Path(path)
        directory = path.parent if path.is_file() else path
        config_file = directory / CONFIG_FILE
        if not config_file.is_file():
            return False
        try:
            cfg = read_json_object(config_file)
        except CheckpointError:
            return False
        # output_dropout_prob is the remote code's name; our consolidated config.json has none
        return (
            cfg.get("model_type") == "glm"
            and "output_dropout_prob" in cfg
            and any((directory / name).exists() for name in self._weight_names())
        )

    @staticmethod
    def _weight_names() -> tuple[str, ...]:
        return (
            SAFETENSORS_FILE,
            BIN_FILE,
            SAFETENSORS_FILE + ".index.json",
            BIN_FILE + ".index.json",
        )

    def read(self, path: Path, config: GLMConfig | None = None) -> CanonicalCheckpoint:
        path = Path(path)
        directory = path.parent if path.is_file() else path
        config_file = directory / CONFIG_FILE
        cfg = read_json_object(config_file)
        file_config = config_from_hf(cfg, str(config_file))
        files = [path] if path.is_file() else _weight_files(directory)
        state, metadata = _read_weights(files)
        embedded = parse_embedded(metadata.get(EMBEDDED_KEY), files[0]) or {}
        problems = []
        if config is None and isinstance(embedded.get("config"), dict):
            config = config_from_dict(
                embedded["config"], f"{files[0]}: its {EMBEDDED_KEY} metadata"
            )
            what = f"the {EMBEDDED_KEY} metadata"
        else:
            what = "the given model config"
        if config is None:
            config = file_config
        else:
            found = {name: getattr(file_config, name) for name in _CONFIG_JSON_FIELDS}
            problems += fit_problems(config, found, str(directory), what, "config.json")
        if problems:
            raise CheckpointError(problems)

        prefixed = [k for k in state if k.startswith(PREFIX)]
        if prefixed and len(prefixed) != len(state):
            others = [k for k in state if not k.startswith(PREFIX)]
            raise CheckpointError(
                [
                    f"{directory}: some tensors are under {PREFIX!r} and some are not "
                    f"({', '.join(others[:6])}): a head class's extra weights?"
                ]
            )
        if prefixed:
            state = {k[len(PREFIX) :]: v for k, v in state.items()}
        # safetensors stores names sorted: give them the model's order back
        order = {name: i for i, name in enumerate(canonical_names(config))}
        state = dict(sorted(state.items(), key=lambda kv: order.get(kv[0], len(order))))
        checkpoint = CanonicalCheckpoint(
            config=config,
            state=state,
            iteration=embedded.get("iteration"),
            tokenizer=embedded.get("tokenizer"),
            source=str(files[0] if len(files) == 1 else directory),
            extra={"hf_config": cfg, "prefixed": bool(prefixed)},
        )
        checkpoint.check()
        return checkpoint

    def write(
        self,
        checkpoint: CanonicalCheckpoint,
        out: Path,
        *,
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
    ) -> None:
        """Write ``out/config.json`` and ``out/model.safetensors`` (one unpartitioned model)."""
        check_write_request(
            checkpoint,
            tensor_parallel,
            pipeline_parallel,
            form="Hugging Face",
            partitioned=False,
            pipelined=False,
        )
        out = Path(out)
        dtype = checkpoint.state["word_embeddings.weight"].dtype
        config_json = hf_config(checkpoint.config, out.name, dtype)
        tensors = {PREFIX + name: t for name, t in checkpoint.state.items()}
        metadata = {"format": "pt", EMBEDDED_KEY: embedded_json(checkpoint)}
        with staged_directory(out) as staging:
            write_json(staging / CONFIG_FILE, config_json)
            write_safetensors(tensors, staging / SAFETENSORS_FILE, metadata)
        logger.info("wrote the Hugging Face GLM layout to %s", out)


FORM = HFForm()
