"""The consolidated form (docs/checkpoints.md#forms): one directory a plain PyTorch user can load.

::

    <dir>/
      config.json            GLMConfig.to_dict(): the architecture (and its run-time defaults)
      model.safetensors      every weight at TP = 1 under the canonical names
      tokenizer_config.json  the TokenizerSpec fields, file fields naming the files below
      sp.model, sp.json ...  copies of the tokenizer files (when the source names them)

``GLMModel.from_pretrained(dir)`` builds the model from it. The safetensors metadata records the
training iteration and the source the weights came from. Nothing here is a pickle.

A tokenizer spec whose files are not found when writing (a training run's relative paths, read on
another machine) is recorded as it is, with a warning; a spec that needs no files (the bundled
vocabularies: ``--tokenizer-model-type`` alone) is recorded as it is.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from megatron_glm.config import GLMConfig
from megatron_glm.config.data import TokenizerSpec
from megatron_glm.conversion.canonical import (
    REQUIRED_FIELDS,
    CanonicalCheckpoint,
    CheckpointError,
    canonical_names,
    check_write_request,
    config_from_dict,
    config_problems,
    state_problems,
)
from megatron_glm.conversion.files import (
    read_json_object,
    read_safetensors,
    staged_directory,
    write_json,
    write_safetensors,
)

logger = logging.getLogger(__name__)

NAME = "consolidated"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_RESERVED = frozenset({CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_CONFIG_FILE})
TOKENIZER_FILE_FIELDS = ("tokenizer_model", "vocab_file", "merge_file")
_SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "ChineseSPTokenizer")


def read_tokenizer_config(directory: Path) -> dict[str, Any] | None:
    """The tokenizer spec of a consolidated directory, its file names resolved against it
    (``None`` when the directory records no tokenizer)."""
    path = Path(directory) / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return None
    spec = read_json_object(path)
    for field in TOKENIZER_FILE_FIELDS:
        value = spec.get(field)
        if value and not Path(value).is_absolute() and (path.parent / value).exists():
            spec[field] = str((path.parent / value).resolve())
    try:
        TokenizerSpec(**spec)
    except (TypeError, ValueError) as err:
        raise CheckpointError([f"{path}: invalid tokenizer spec: {err}"]) from None
    return spec


def tokenizer_spec(directory: str | Path) -> TokenizerSpec | None:
    """The ``TokenizerSpec`` a consolidated directory records (for ``tokenizer_from_spec``)."""
    spec = read_tokenizer_config(Path(directory))
    return None if spec is None else TokenizerSpec(**spec)


def _free_name(name: str, used: set[str]) -> str:
    while name in _RESERVED or name in used:
        name = "tokenizer_" + name
    return name


def copy_tokenizer_files(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """Copy the files ``spec`` names into ``out``; returns the spec naming the copies relative to
    ``out``. A sentencepiece model keeps its ``PREFIX.json`` metadata next to it (same stem)."""
    from megatron_glm.data.sentencepiece import sentencepiece_metadata_path

    spec = dict(spec)
    used: set[str] = set()
    for field in TOKENIZER_FILE_FIELDS:
        value = spec.get(field)
        if not value:
            continue
        src = Path(value)
        if src.is_dir() and (src / "tokenizer.json").is_file():  # HuggingFaceTokenizer directory
            src = src / "tokenizer.json"
        if not src.is_file():
            logger.warning(
                "tokenizer file %s (%s) not found: recorded as given, not copied", value, field
            )
            continue
        name = _free_name(src.name, used)
        metadata = None
        if field == "tokenizer_model" and spec.get("tokenizer_type") in _SENTENCEPIECE_TYPES:
            src_meta = Path(sentencepiece_metadata_path(str(src)))
            if src_meta.is_file():
                meta_name = Path(sentencepiece_metadata_path(name)).name
                if meta_name in _RESERVED or meta_name in used:
                    name = _free_name("tokenizer.model", used)
                    meta_name = Path(sentencepiece_metadata_path(name)).name
                metadata = (src_meta, meta_name)
        shutil.copyfile(src, out / name)
        used.add(name)
        if metadata is not None:
            shutil.copyfile(metadata[0], out / metadata[1])
            used.add(metadata[1])
        spec[field] = name
        logger.info("copied tokenizer file %s to %s", src, out / name)
    return spec


class ConsolidatedForm:
    """``config.json`` + ``model.safetensors`` (+ tokenizer files), TP = 1 only."""

    name = NAME

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            return False
        try:
            obj = read_json_object(path / CONFIG_FILE)
        except CheckpointError:
            return False
        # a Hugging Face config.json has the same size keys, and always model_type
        return "model_type" not in obj and all(k in obj for k in REQUIRED_FIELDS)  # else not ours

    def read(self, path: Path, config: GLMConfig | None = None) -> CanonicalCheckpoint:
        path = Path(path)
        config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        model = config_from_dict(read_json_object(config_path), str(config_path))
        problems = [] if config is None else config_problems(model, config, str(config_path))
        if problems:
            raise CheckpointError(problems)
        logger.info("reading %s (consolidated)", path)
        state, metadata = read_safetensors(weights_path)
        problems = state_problems(state, model, str(weights_path))
        if problems:
            raise CheckpointError(problems)
        iteration = metadata.get("iteration")
        return CanonicalCheckpoint(
            config=model,
            state={name: state[name] for name in canonical_names(model)},
            iteration=int(iteration) if iteration and iteration.isdigit() else None,
            tokenizer=read_tokenizer_config(path),
            source=str(path.resolve()),
        )

    def write(
        self,
        checkpoint: CanonicalCheckpoint,
        out: Path,
        *,
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
    ) -> None:
        check_write_request(
            checkpoint,
            tensor_parallel,
            pipeline_parallel,
            form=self.name,
            partitioned=False,
            pipelined=False,
        )
        metadata = {"format": "pt", "source": checkpoint.source}
        if checkpoint.iteration is not None:
            metadata["iteration"] = str(checkpoint.iteration)
        state = {name: checkpoint.state[name] for name in canonical_names(checkpoint.config)}
        with staged_directory(out) as staging:
            write_json(staging / CONFIG_FILE, checkpoint.config.to_dict())
            write_safetensors(state, staging / WEIGHTS_FILE, metadata)
            if checkpoint.tokenizer:
                spec = copy_tokenizer_files(checkpoint.tokenizer, staging)
                write_json(staging / TOKENIZER_CONFIG_FILE, spec)
        logger.info("wrote %s (consolidated, %d tensors)", out, len(state))


FORM = ConsolidatedForm()
