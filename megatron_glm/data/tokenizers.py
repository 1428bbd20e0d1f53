"""Tokenizers with GLM's command tokens (GLM_SPEC §4).

``build_tokenizer(tokenizer_type, ...)`` returns a ``GLMTokenizer``:

- ``SentencePieceTokenizer``: a ``.model`` trained by ``train_sentencepiece`` (or
  ``tools/train_tokenizer.py``). The command tokens are reserved ids inside the model; which id is
  which is recorded in the metadata file ``PREFIX.json`` next to ``PREFIX.model``, read and
  checked against the model when it is loaded.
- ``GPT2BPETokenizer``: byte-level BPE from the user's ``vocab.json`` + ``merges.txt`` (Rust
  ``tokenizers``); command tokens appended after the vocabulary at the official GLM ids
  (50257-base: eos/pad 50256, sop 50257, eop 50258, CLS 50259, MASK 50260, SEP 50261, UNK 50262,
  gMASK 50263, sMASK 50264).
- ``BertWordPieceLowerCase`` / ``BertWordPieceCase``: WordPiece from the user's ``vocab.txt``;
  pad = eos = ``[PAD]``, CLS/SEP/UNK/MASK from the vocabulary, sop/eop/gMASK/sMASK appended
  (30522, 30523, 30524, 30525 for the 30522-entry BERT vocabulary).

Command-token texts written in the input (``[MASK]``, ``[gMASK]``, ...) encode to the command ids,
as in the official GLM (it splits text on command tokens before tokenizing). Nothing is
downloaded: every tokenizer is built from files the user provides.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

COMMAND_TOKEN_NAMES = ("pad", "eos", "cls", "mask", "smask", "gmask", "sop", "eop", "unk", "sep")
# Characters whose presence in a token ends a sentence (GLM_SPEC §3 gap-sentence objective).
SENTENCE_END_CHARS = frozenset(".?!;:\n。？！；：")

TOKENIZER_TYPES = (
    "SentencePieceTokenizer",
    "GPT2BPETokenizer",
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class GLMTokenizer(abc.ABC):
    """Text <-> ids plus GLM's command tokens. ``vocab_size`` counts every id, command tokens
    included, before the model pads the embedding table."""

    name: str = "GLMTokenizer"

    def __init__(self, command_tokens: dict[str, int], vocab_size: int) -> None:
        missing = [n for n in COMMAND_TOKEN_NAMES if n not in command_tokens]
        assert not missing, f"command tokens {missing} not defined"
        bad = {n: i for n, i in command_tokens.items() if not 0 <= i < vocab_size}
        assert not bad, f"command token ids {bad} outside vocab of {vocab_size}"
        self._command_tokens = dict(command_tokens)
        self._vocab_size = vocab_size
        self._sentence_end_mask: np.ndarray | None = None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in one call into the C++/Rust tokenizer (multi-threaded there)."""

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode_batch`` as int arrays (what offline preprocessing writes)."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    @abc.abstractmethod
    def _token_texts(self) -> list[str]:
        """Surface text of every id alone ('' for ids that print nothing)."""

    @abc.abstractmethod
    def metadata(self) -> dict[str, Any]:
        """JSON-able description: type, vocab size, command ids, source files and checksums."""

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def command_tokens(self) -> dict[str, int]:
        return dict(self._command_tokens)

    def sentence_end_mask(self) -> np.ndarray:
        """``mask[id]`` is True when token ``id`` ends a sentence: its text contains
        ``. ? ! ; :``, a CJK full stop/question/exclamation/semicolon/colon, or a newline.
        Command tokens never do."""
        if self._sentence_end_mask is None:
            texts = self._token_texts()
            assert len(texts) == self._vocab_size
            mask = np.fromiter(
                (not SENTENCE_END_CHARS.isdisjoint(t) for t in texts), dtype=bool, count=len(texts)
            )
            mask[list(self._command_tokens.values())] = False
            self._sentence_end_mask = mask
        return self._sentence_end_mask

    pad_id = property(lambda self: self._command_tokens["pad"])
    eos_id = property(lambda self: self._command_tokens["eos"])
    cls_id = property(lambda self: self._command_tokens["cls"])
    mask_id = property(lambda self: self._command_tokens["mask"])
    smask_id = property(lambda self: self._command_tokens["smask"])
    gmask_id = property(lambda self: self._command_tokens["gmask"])
    sop_id = property(lambda self: self._command_tokens["sop"])
    eop_id = property(lambda self: self._command_tokens["eop"])
    unk_id = property(lambda self: self._command_tokens["unk"])
    sep_id = property(lambda self: self._command_tokens["sep"])

    def __repr__(self) -> str:
        return f"{self.name}(vocab_size={self.vocab_size}, command_tokens={self._command_tokens})"


# ---- SentencePiece -----------------------------------------------------------------------------

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


class SentencePieceTokenizer(GLMTokenizer):
    name = "SentencePieceTokenizer"

    def __init__(self, model_path: str, num_threads: int = -1) -> None:
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"sentencepiece model {model_path} does not exist")
        meta_path = sentencepiece_metadata_path(model_path)
        if not os.path.isfile(meta_path):
            raise ValueError(
                f"sentencepiece model {model_path} has no metadata file {meta_path}: train it with "
                "tools/train_tokenizer.py, which reserves the GLM command tokens and records them"
            )
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        self.model_path = model_path
        self.num_threads = num_threads
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self._validate_metadata(meta, meta_path)
        commands = {name: int(entry["id"]) for name, entry in meta["command_tokens"].items()}
        super().__init__(commands, self._sp.get_piece_size())

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
        return self._sp.decode([int(i) for i in ids])

    def _token_texts(self) -> list[str]:
        texts = []
        for i in range(self._sp.get_piece_size()):
            piece = self._sp.id_to_piece(i)
            if self._sp.is_byte(i):
                value = int(piece[3:5], 16)  # "<0x0A>"
                texts.append(chr(value) if value < 0x80 else "")
            elif self._sp.is_control(i) or self._sp.is_unknown(i):
                texts.append("")
            else:
                texts.append(piece.replace("\u2581", " "))
        return texts

    def metadata(self) -> dict[str, Any]:
        return {
            "type": self.name,
            "vocab_size": self.vocab_size,
            "command_tokens": self.command_tokens,
            "model_file": os.path.abspath(self.model_path),
            "model_sha256": file_sha256(self.model_path),
        }

    def __getstate__(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "num_threads": self.num_threads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model_path"], state["num_threads"])


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
    ``decode(encode(text)) == text`` for code and indented text.
    """
    import sentencepiece as spm

    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    reserved = 1 + len(SP_USER_SYMBOLS) + 1 + (256 if byte_fallback else 0)
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size {vocab_size} must exceed the {reserved} reserved pieces")
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
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
            "character_coverage": character_coverage,
            "byte_fallback": byte_fallback,
            "seed": seed,
        },
    }
    with open(sentencepiece_metadata_path(model_path), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return model_path


# ---- Rust `tokenizers` (GPT-2 byte-level BPE, BERT WordPiece) ----------------------------------


class _HFTokenizer(GLMTokenizer):
    """Shared encode/decode over a ``tokenizers.Tokenizer`` whose command tokens are special
    tokens (matched in the input text, never split)."""

    def __init__(
        self, tokenizer: Any, command_tokens: dict[str, int], files: dict[str, str]
    ) -> None:
        self._tok = tokenizer
        self._files = files
        super().__init__(command_tokens, tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips the character offsets we never use (tokenizers >= 0.20).
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _token_texts(self) -> list[str]:
        return self._tok.decode_batch(
            [[i] for i in range(self.vocab_size)], skip_special_tokens=True
        )

    def metadata(self) -> dict[str, Any]:
        return {
            "type": self.name,
            "vocab_size": self.vocab_size,
            "command_tokens": self.command_tokens,
            "files": {k: os.path.abspath(p) for k, p in self._files.items()},
            "sha256": {k: file_sha256(p) for k, p in self._files.items()},
        }

    def __getstate__(self) -> dict[str, Any]:
        return {"files": self._files}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state["files"])


def _add_command_tokens(tok: Any, texts: dict[str, str]) -> dict[str, int]:
    """Register ``texts`` (name -> token text) as special tokens, in order; existing vocabulary
    entries keep their ids, new ones are appended. Returns name -> id."""
    from tokenizers import AddedToken

    unique = list(dict.fromkeys(texts.values()))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in unique])
    return {name: tok.token_to_id(text) for name, text in texts.items()}


class GPT2BPETokenizer(_HFTokenizer):
    name = "GPT2BPETokenizer"
    # Appended after the 50257 GPT-2 entries in this order -> the official GLM ids 50257..50264.
    COMMAND_TEXTS = {
        "eos": "<|endoftext|>",
        "pad": "<|endoftext|>",
        "sop": "<|startofpiece|>",
        "eop": "<|endofpiece|>",
        "cls": "[CLS]",
        "mask": "[MASK]",
        "sep": "[SEP]",
        "unk": "[UNK]",
        "gmask": "[gMASK]",
        "smask": "[sMASK]",
    }

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        for path in (vocab_file, merge_file):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"GPT-2 BPE file {path} does not exist")
        tok = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        base = tok.get_vocab_size(with_added_tokens=False)
        if tok.token_to_id(self.COMMAND_TEXTS["eos"]) is None:
            logger.warning("%s has no <|endoftext|>; it is appended at id %d", vocab_file, base)
        commands = _add_command_tokens(tok, self.COMMAND_TEXTS)
        if base == 50257 and commands["eos"] != 50256:
            raise ValueError(
                f"{vocab_file}: <|endoftext|> is id {commands['eos']}, the GPT-2 "
                "vocabulary has it at 50256"
            )
        super().__init__(tok, commands, {"vocab_file": vocab_file, "merge_file": merge_file})


class BertWordPieceTokenizer(_HFTokenizer):
    name = "BertWordPieceLowerCase"
    IN_VOCAB = {
        "pad": "[PAD]",
        "eos": "[PAD]",
        "cls": "[CLS]",
        "sep": "[SEP]",
        "unk": "[UNK]",
        "mask": "[MASK]",
    }
    APPENDED = {
        "sop": "<|startofpiece|>",
        "eop": "<|endofpiece|>",
        "gmask": "[gMASK]",
        "smask": "[sMASK]",
    }

    def __init__(self, vocab_file: str, lower_case: bool = True) -> None:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"BERT vocab file {vocab_file} does not exist")
        vocab = models.WordPiece.read_file(vocab_file)
        model = models.WordPiece(vocab, unk_token="[UNK]")
        missing = sorted({t for t in self.IN_VOCAB.values() if t not in vocab})
        if missing:
            raise ValueError(f"{vocab_file}: BERT vocabulary lacks {missing}")
        tok = Tokenizer(model)
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True,
            handle_chinese_chars=True,
            strip_accents=lower_case,
            lowercase=lower_case,
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        commands = _add_command_tokens(tok, {**self.IN_VOCAB, **self.APPENDED})
        self.lower_case = lower_case
        self.name = "BertWordPieceLowerCase" if lower_case else "BertWordPieceCase"
        super().__init__(tok, commands, {"vocab_file": vocab_file})

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["files"]["vocab_file"], lower_case=state["lower_case"])

    def __getstate__(self) -> dict[str, Any]:
        return {"files": self._files, "lower_case": self.lower_case}


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
) -> GLMTokenizer:
    """The tokenizer named by ``tokenizer_type`` (Megatron's names), built from local files."""

    def need(value: str | None, flag: str) -> str:
        if not value:
            raise ValueError(f"tokenizer type {tokenizer_type} needs {flag}")
        return value

    if tokenizer_type == "SentencePieceTokenizer":
        tokenizer: GLMTokenizer = SentencePieceTokenizer(need(tokenizer_model, "--tokenizer-model"))
    elif tokenizer_type == "GPT2BPETokenizer":
        tokenizer = GPT2BPETokenizer(
            need(vocab_file, "--vocab-file"), need(merge_file, "--merge-file")
        )
    elif tokenizer_type in ("BertWordPieceLowerCase", "BertWordPieceCase"):
        tokenizer = BertWordPieceTokenizer(
            need(vocab_file, "--vocab-file"), lower_case=tokenizer_type == "BertWordPieceLowerCase"
        )
    else:
        raise ValueError(
            f"unknown tokenizer type {tokenizer_type!r}; choose from {', '.join(TOKENIZER_TYPES)}"
        )
    logger.debug("built %r", tokenizer)
    return tokenizer
