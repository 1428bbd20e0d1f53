"""Sentencepiece tokenizers with GLM's command tokens (docs/tokenizers.md).

- ``SentencePieceTokenizer``: a model trained by ``train_sentencepiece`` (``tools/train_tokenizer.py``)
  holds the command tokens as pieces (the reserved layout), and ``PREFIX.json`` next to
  ``PREFIX.model`` records which id is which.
- ``ChineseSPTokenizer``: any other sentencepiece model, the command tokens appended after its
  pieces as the official GLM's ``ChineseSPTokenizer`` does (the released ``cog-pretrain.model``
  when no model is given).

``megatron_glm.data.tokenizers.build_tokenizer`` builds both by name; this module holds what is
particular to sentencepiece, the shared machinery stays there.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from megatron_glm.data.tokenizers import (
    COMMAND_TOKEN_NAMES,
    DBLOCK,
    AppendedTokenizer,
    CommandToken,
    GLMTokenizer,
    bundled_vocab_file,
    command_layout,
    file_sha256,
    is_valid_unicode,
)

logger = logging.getLogger(__name__)

# ---- Reserved layout (models we train) ----------------------------------------------------------

# Command-token pieces reserved in the models we train. UNK is sentencepiece's own unknown piece
# (id 0); the others are user-defined symbols, so their text in the input maps to their id (in
# C++). "\n" is reserved too: sentencepiece trains on lines and would otherwise never learn it,
# and newlines end sentences and carry structure in code/docs.
SP_UNK_PIECE = "[UNK]"
SP_USER_SYMBOLS = {
    "pad": "[pad]",
    "eos": "[eos]",
    "cls": "[CLS]",
    "mask": "[MASK]",
    "smask": "[sMASK]",
    "gmask": "[gMASK]",
    "sop": "[sop]",
    "eop": "[eop]",
    "sep": "[SEP]",
}
SP_NEWLINE = "\n"
SP_METADATA_FORMAT = "megatron_glm.sentencepiece"


def sentencepiece_metadata_path(model_path: str) -> str:
    root, ext = os.path.splitext(model_path)
    return (root if ext == ".model" else model_path) + ".json"


def _sentencepiece_piece_texts(sp: Any) -> list[str]:
    texts = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            value = int(piece[3:5], 16)  # "<0x0A>"
            texts.append(chr(value) if value < 0x80 else "")
        elif sp.is_control(i) or sp.is_unknown(i):
            texts.append("")
        else:
            texts.append(piece.replace("\u2581", " "))
    return texts


class SentencePieceTokenizer(GLMTokenizer):
    """A model of ``train_sentencepiece``: command tokens at the ids its ``PREFIX.json`` names.

    ``block_mask_token`` adds ``[dBLOCK]`` one past the last piece. It is no piece of the model:
    only its id is used (block masking writes it into Part B), its text in the input stays text,
    and ``decode`` prints it."""

    name = "SentencePieceTokenizer"

    def __init__(
        self, model_path: str, num_threads: int = -1, block_mask_token: bool = False
    ) -> None:
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"sentencepiece model {model_path} does not exist")
        meta_path = sentencepiece_metadata_path(model_path)
        if not os.path.isfile(meta_path):
            raise ValueError(
                f"sentencepiece model {model_path} has no metadata file {meta_path}; "
                "ChineseSPTokenizer appends the command tokens after its pieces instead"
            )
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        self.model_path = model_path
        self.num_threads = num_threads
        self.block_mask_token = block_mask_token
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self._validate_metadata(meta, meta_path)
        commands = {name: int(entry["id"]) for name, entry in meta["command_tokens"].items()}
        size = self._sp.get_piece_size()
        if block_mask_token:
            commands["dblock"] = size
        super().__init__(commands, size + int(block_mask_token))

    def _validate_metadata(self, meta: dict[str, Any], meta_path: str) -> None:
        if meta.get("format") != SP_METADATA_FORMAT:
            raise ValueError(
                f"{meta_path}: format {meta.get('format')!r} is not {SP_METADATA_FORMAT!r}"
            )
        size = self._sp.get_piece_size()
        if meta.get("vocab_size") != size:
            raise ValueError(
                f"{meta_path}: vocab_size {meta.get('vocab_size')} does not match "
                f"the model {self.model_path} ({size} pieces)"
            )
        sha = meta.get("model_sha256")
        if sha is not None and sha != file_sha256(self.model_path):
            raise ValueError(
                f"{meta_path}: model_sha256 does not match {self.model_path} "
                "(the metadata belongs to a different model)"
            )
        entries = meta.get("command_tokens", {})
        missing = [n for n in COMMAND_TOKEN_NAMES if n not in entries]
        if missing:
            raise ValueError(f"{meta_path}: command tokens {missing} are missing")
        for name, entry in entries.items():
            token_id, text = int(entry["id"]), entry["text"]
            if not 0 <= token_id < size or self._sp.id_to_piece(token_id) != text:
                found = self._sp.id_to_piece(token_id) if 0 <= token_id < size else "<none>"
                raise ValueError(
                    f"{meta_path}: command token {name} should be {text!r} at id "
                    f"{token_id}, but the model has {found!r} there"
                )

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=self.num_threads)

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        # The C++ side fills int32 buffers directly: no Python int objects per token.
        return self._sp.encode(list(texts), num_threads=self.num_threads, return_type="numpy")

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = [int(i) for i in ids]
        dblock = self.dblock_id
        if dblock is None or dblock not in ids:
            return self._sp.decode(ids)
        # sentencepiece knows no [dBLOCK] (it is past the model's pieces): decode around it.
        runs, start = [], 0
        for k in (k for k, i in enumerate(ids) if i == dblock):
            runs.append(self._sp.decode(ids[start:k]))
            start = k + 1
        runs.append(self._sp.decode(ids[start:]))
        return DBLOCK.join(runs)

    def _token_texts(self) -> list[str]:
        texts = _sentencepiece_piece_texts(self._sp)
        return texts + [""] * (self.vocab_size - len(texts))

    def metadata(self) -> dict[str, Any]:
        return {
            "type": self.name,
            "vocab_size": self.vocab_size,
            "command_tokens": self.command_tokens,
            "model_file": os.path.abspath(self.model_path),
            "model_sha256": file_sha256(self.model_path),
        }

    def __getstate__(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "num_threads": self.num_threads,
            "block_mask_token": self.block_mask_token,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)


def train_sentencepiece(
    texts: Iterable[str],
    output_prefix: str,
    vocab_size: int,
    model_type: str = "unigram",
    max_sentences: int = 200_000,
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    num_threads: int | None = None,
    seed: int = 1234,
) -> str:
    """Train a sentencepiece model on the lines of ``texts``; write ``PREFIX.model``,
    ``PREFIX.vocab`` and ``PREFIX.json`` (command-token ids). Returns the model path.

    At most ``max_sentences`` non-empty lines are used (a seeded sample), which bounds the
    training time. Normalisation is the identity and whitespace is kept, so
    ``decode(encode(text)) == text`` for code and indented text. Texts that are not valid
    Unicode (lone surrogates) are skipped and counted in the metadata.
    """
    import sentencepiece as spm

    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    reserved = 1 + len(SP_USER_SYMBOLS) + 1 + (256 if byte_fallback else 0)
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size {vocab_size} must exceed the {reserved} reserved pieces")
    lines, num_invalid = [], 0
    for text in texts:
        if not is_valid_unicode(text):
            num_invalid += 1
            continue
        lines.extend(line for line in text.split("\n") if line.strip())
    if num_invalid:
        logger.warning("skipped %d texts that are not valid Unicode (lone surrogates)", num_invalid)
    if not lines:
        raise ValueError("no non-empty text to train the tokenizer on")
    if len(lines) > max_sentences:
        keep = np.random.default_rng(seed).choice(len(lines), size=max_sentences, replace=False)
        lines = [lines[i] for i in np.sort(keep)]
    logger.info(
        "training a %s sentencepiece model of %d pieces on %d lines",
        model_type,
        vocab_size,
        len(lines),
    )
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=output_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            unk_id=0,
            unk_piece=SP_UNK_PIECE,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            user_defined_symbols=[*SP_USER_SYMBOLS.values(), SP_NEWLINE],
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as err:  # how sentencepiece reports settings its corpus cannot meet
        raise ValueError(f"sentencepiece training of {output_prefix} failed: {err}") from None
    model_path = output_prefix + ".model"
    sp = spm.SentencePieceProcessor(model_file=model_path)
    commands = {"unk": {"id": sp.piece_to_id(SP_UNK_PIECE), "text": SP_UNK_PIECE}}
    for name, text in SP_USER_SYMBOLS.items():
        commands[name] = {"id": sp.piece_to_id(text), "text": text}
    meta = {
        "format": SP_METADATA_FORMAT,
        "version": 1,
        "model_file": os.path.basename(model_path),
        "model_sha256": file_sha256(model_path),
        "vocab_size": sp.get_piece_size(),
        "command_tokens": {name: commands[name] for name in COMMAND_TOKEN_NAMES},
        "newline_id": sp.piece_to_id(SP_NEWLINE),
        "trainer": {
            "model_type": model_type,
            "max_sentences": max_sentences,
            "num_lines": len(lines),
            "num_invalid_texts": num_invalid,
            "character_coverage": character_coverage,
            "byte_fallback": byte_fallback,
            "seed": seed,
        },
    }
    with open(sentencepiece_metadata_path(model_path), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return model_path


# ---- Appended layout (any other model; the official ChineseSPTokenizer) -------------------------


def _chinese_sp_commands(n: int, fix_command_token: bool) -> tuple[list[CommandToken], int]:
    """The official ChineseSPTokenizer's ids after ``n`` pieces, and the vocabulary size. n + 5
    stays unused (the official code places sop one past its token count). Without the fix its
    count lags by one more, so [gMASK] lands on eop's id; the models trained that way expect it."""
    ids = {"pad": n, "eos": n, "sep": n + 1, "cls": n + 2, "mask": n + 3, "unk": n + 4}
    ids |= {"sop": n + 6, "eop": n + 7}
    if fix_command_token:
        return command_layout(ids | {"smask": n + 8, "gmask": n + 9}), n + 10
    return command_layout(ids | {"gmask": n + 7, "smask": n + 8}), n + 9


class ChineseSPTokenizer(AppendedTokenizer):
    """Any sentencepiece model with the command tokens appended after its pieces, as the official
    ``ChineseSPTokenizer`` does; without ``model_path``, the released ``cog-pretrain.model``."""

    name = "ChineseSPTokenizer"

    def __init__(
        self,
        model_path: str | None = None,
        fix_command_token: bool = False,
        num_threads: int = -1,
        block_mask_token: bool = False,
    ) -> None:
        import sentencepiece as spm

        model_path = model_path or bundled_vocab_file("cog-pretrain.model")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"sentencepiece model {model_path} does not exist")
        self._init_kwargs = dict(
            model_path=model_path,
            fix_command_token=fix_command_token,
            num_threads=num_threads,
            block_mask_token=block_mask_token,
        )
        self._source_files = {"model_path": model_path}
        self.model_path = model_path
        self.num_threads = num_threads
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        n = self._sp.get_piece_size()
        commands, vocab_size = _chinese_sp_commands(n, fix_command_token)
        unk = self._sp.unk_id()
        reserved = [t for t in SP_USER_SYMBOLS.values() if self._sp.piece_to_id(t) != unk]
        if reserved:  # a model of tools/train_tokenizer.py that lost its PREFIX.json
            logger.warning(
                "%s has the reserved pieces %s but no metadata file: they stay unused and the "
                "command tokens are appended after its pieces",
                *(model_path, reserved),
            )
        super().__init__(commands, vocab_size, n, block_mask_token)

    def _encode_segments(self, segments: list[str]) -> list[list[int]]:
        return self._sp.encode(segments, num_threads=self.num_threads)

    def _decode_text(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _text_token_texts(self) -> list[str]:
        return _sentencepiece_piece_texts(self._sp)
