"""Tokenizers with GLM's command tokens (docs/tokenizers.md lists every type, file and id).

``build_tokenizer(tokenizer_type, ...)`` and ``tokenizer_from_spec(spec)`` return a
``GLMTokenizer``; ``TOKENIZER_BUILDERS`` holds one builder per name of
``megatron_glm.config.data.TOKENIZER_TYPES``. Command tokens come in two layouts:

- reserved: a sentencepiece model trained by ``train_sentencepiece`` (``tools/train_tokenizer.py``)
  holds them as pieces, and ``PREFIX.json`` next to ``PREFIX.model`` records which id is which.
- appended (the official GLM's): the text tokenizer knows nothing of them. They reuse some of its
  entries or get ids after its vocabulary, and the input is split on their texts before the text
  tokenizer sees it, exactly as the official ``Tokenizer.EncodeAsIds`` does. This is
  ``ChineseSPTokenizer`` (any sentencepiece model without a metadata file), ``GPT2BPETokenizer``
  (gpt2 and roberta vocabularies), the BERT WordPiece types and ``HuggingFaceTokenizer``.

With ``block_mask_token`` every tokenizer also has ``[dBLOCK]`` (``dblock_id``), one past its
other ids, as the official code adds it for ``--block-mask-prob``.

This module holds the shared machinery, the Rust ``tokenizers`` types and the registry; the
sentencepiece types and the trainer live in ``megatron_glm.data.sentencepiece``. Nothing is
downloaded: the files come from the user, or are the released GLM vocabularies bundled in
``megatron_glm/data/vocab`` (used when no file is given).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_glm.config.data import TOKENIZER_TYPES, TokenizerSpec

logger = logging.getLogger(__name__)


COMMAND_TOKEN_NAMES = ("pad", "eos", "cls", "mask", "smask", "gmask", "sop", "eop", "unk", "sep")
# Characters whose presence in a token ends a sentence (the gap-sentence objective,
# docs/blank-infilling.md).
SENTENCE_END_CHARS = frozenset(".?!;:\n。？！；：")
VOCAB_DIR = Path(__file__).resolve().with_name("vocab")

# The official command-token texts of the appended layouts.
EOT, SOP, EOP = "<|endoftext|>", "<|startofpiece|>", "<|endofpiece|>"
# The official add_decoder_mask token: block masking (--block-mask-prob) writes it into Part B.
DBLOCK = "[dBLOCK]"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundled_vocab_file(name: str) -> str:
    """Path of a released vocabulary file shipped in ``megatron_glm/data/vocab``."""
    path = VOCAB_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled vocabulary {path} is missing (megatron_glm installed without its package "
            "data?); pass the file explicitly"
        )
    return str(path)


def is_valid_unicode(text: str) -> bool:
    """False for text that cannot be UTF-8 encoded (a lone surrogate such as ``"\\ud800"``, which
    JSON can escape): the C++/Rust tokenizers reject it with an opaque error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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

    @property
    def dblock_id(self) -> int | None:
        """``[dBLOCK]`` when built with ``block_mask_token``, else None (blank infilling then
        uses ``[MASK]`` for block masking)."""
        return self._command_tokens.get("dblock")

    def identity(self) -> dict[str, Any]:
        """What the ids of a tokenized corpus depend on: the vocabulary (a digest of every token's
        text), its size and the command-token ids; ``[dBLOCK]``, never in data, is left out. Two
        tokenizers with the same identity give the same ids (``tools/preprocess_data.py`` records
        it next to a dataset; the trainer compares)."""
        texts = self._token_texts()
        size = self.vocab_size - (self.dblock_id is not None)
        digest = hashlib.sha256("\x00".join(texts[:size]).encode("utf-8", "surrogatepass"))
        commands = {k: v for k, v in self.command_tokens.items() if k != "dblock"}
        return {"vocab_size": size, "vocab_sha256": digest.hexdigest(), "command_tokens": commands}

    def __repr__(self) -> str:
        return f"{self.name}(vocab_size={self.vocab_size}, command_tokens={self._command_tokens})"


# ---- Appended layout (the official GLM's) ------------------------------------------------------


@dataclass(frozen=True)
class CommandToken:
    """One command token of the appended layout: ``text`` written in the input encodes to ``id``.
    ``lstrip``: the token eats the whitespace before it (the official [MASK]/[gMASK]/[sMASK] of
    the GPT-2 and Chinese tokenizers), so ``"a [MASK]"`` and ``"a[MASK]"`` encode alike."""

    name: str
    text: str
    id: int
    lstrip: bool = False


# The official texts of the command tokens, and those that strip the whitespace before them.
GLM_TEXTS = {
    "pad": EOT,
    "eos": EOT,
    "sep": "[SEP]",
    "cls": "[CLS]",
    "mask": "[MASK]",
    "unk": "[UNK]",
    "sop": SOP,
    "eop": EOP,
    "gmask": "[gMASK]",
    "smask": "[sMASK]",
}
LSTRIP_NAMES = ("mask", "gmask", "smask")


def command_layout(
    ids: dict[str, int],
    texts: dict[str, str] = GLM_TEXTS,
    lstrip: Sequence[str] = LSTRIP_NAMES,
) -> list[CommandToken]:
    """Command tokens from name -> id, in the order of ``ids`` (the official list order)."""
    return [CommandToken(name, texts[name], i, name in lstrip) for name, i in ids.items()]


class AppendedTokenizer(GLMTokenizer):
    """A text tokenizer (``_encode_segments``/``_decode_text``) under official command tokens.

    Encoding follows the official ``EncodeAsIds``: text that is only whitespace encodes to
    nothing; otherwise it is split on the command texts, each piece of text between them is
    encoded alone by the text tokenizer, and each command text becomes its id. The official code
    splits once per command token; no command text overlaps another, so one alternation gives the
    same pieces.

    ``block_mask_token`` appends ``[dBLOCK]`` at ``vocab_size``, after every other command token
    (the official ``add_decoder_mask``); like the official token it strips no whitespace."""

    _decode_separator = ""

    def __init__(
        self,
        commands: Sequence[CommandToken],
        vocab_size: int,
        num_text_ids: int,
        block_mask_token: bool = False,
    ) -> None:
        if block_mask_token:
            commands = [*commands, CommandToken("dblock", DBLOCK, vocab_size)]
            vocab_size += 1
        # Later entries win where two share a text or an id, as in the official lookup dicts.
        self._text_to_id = {c.text: c.id for c in commands}
        self._id_to_text = {c.id: c.text for c in commands}
        self._lstrip = frozenset(c.text for c in commands if c.lstrip)
        by_length = sorted(self._text_to_id, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, by_length)))
        self._num_text_ids = num_text_ids
        self._commands = list(commands)
        super().__init__({c.name: c.id for c in commands}, vocab_size)

    @abc.abstractmethod
    def _encode_segments(self, segments: list[str]) -> list[list[int]]: ...

    @abc.abstractmethod
    def _decode_text(self, ids: list[int]) -> str: ...

    @abc.abstractmethod
    def _text_token_texts(self) -> list[str]:
        """Surface text of the text tokenizer's ids ``0 .. num_text_ids - 1``."""

    def _split(self, text: str) -> list[str | int]:
        if not text.strip():
            return []
        parts: list[str | int] = []
        start = 0
        for match in self._pattern.finditer(text):
            before = text[start : match.start()]
            if match.group() in self._lstrip:
                before = before.rstrip()
            if before:
                parts.append(before)
            parts.append(self._text_to_id[match.group()])
            start = match.end()
        if start < len(text):
            parts.append(text[start:])
        return parts

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # All pieces of text of the batch go to the text tokenizer in one call.
        parts = [self._split(t) for t in texts]
        segments = [p for ps in parts for p in ps if isinstance(p, str)]
        encoded = iter(self._encode_segments(segments) if segments else [])
        result = []
        for ps in parts:
            if len(ps) == 1 and isinstance(ps[0], str):  # the common case: no command text
                result.append(next(encoded))
                continue
            ids: list[int] = []
            for p in ps:
                if isinstance(p, str):
                    ids.extend(next(encoded))
                else:
                    ids.append(p)
            result.append(ids)
        return result

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            text = self._id_to_text.get(i)
            if text is None:
                if 0 <= i < self._num_text_ids:  # ids the official layout leaves unused: ''
                    run.append(i)
                continue
            if run:
                out.append(self._decode_text(run))
                run = []
            out.append(text)
        if run:
            out.append(self._decode_text(run))
        return self._decode_separator.join(out)

    def _token_texts(self) -> list[str]:
        return self._text_token_texts() + [""] * (self.vocab_size - self._num_text_ids)

    def metadata(self) -> dict[str, Any]:
        files = self._source_files
        return {
            "type": self.name,
            "vocab_size": self.vocab_size,
            "command_tokens": self.command_tokens,
            "command_texts": {c.name: c.text for c in self._commands},
            "options": {k: v for k, v in self._init_kwargs.items() if k not in files},
            "files": {k: os.path.abspath(p) for k, p in files.items()},
            "sha256": {k: file_sha256(p) for k, p in files.items()},
        }

    # Set by each subclass before this __init__: its constructor arguments (worker processes
    # rebuild the tokenizer from them instead of pickling C++/Rust state) and its files.
    _init_kwargs: dict[str, Any]
    _source_files: dict[str, str]

    def __getstate__(self) -> dict[str, Any]:
        return dict(self._init_kwargs)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)


# ---- Rust `tokenizers` (byte-level BPE, WordPiece, tokenizer.json) ------------------------------


class _RustTokenizer(AppendedTokenizer):
    def __init__(
        self,
        tok: Any,
        commands: Sequence[CommandToken],
        vocab_size: int,
        num_text_ids: int,
        block_mask_token: bool,
    ) -> None:
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        super().__init__(commands, vocab_size, num_text_ids, block_mask_token)

    def _encode_segments(self, segments: list[str]) -> list[list[int]]:
        # encode_batch_fast skips the character offsets we never use (tokenizers >= 0.20).
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(segments, add_special_tokens=False)]

    def _decode_text(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def _text_token_texts(self) -> list[str]:
        ids = [[i] for i in range(self._num_text_ids)]
        return self._tok.decode_batch(ids, skip_special_tokens=True)


def _require_files(kind: str, *paths: str) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{kind} file {path} does not exist")


def _require_entries(vocab: dict[str, int], texts: Iterable[str], source: str) -> None:
    missing = sorted({t for t in texts if t not in vocab})
    if missing:
        raise ValueError(f"{source}: the vocabulary lacks {missing}")


GPT2_MODEL_TYPES = ("gpt2", "roberta")


def _gpt2_commands(
    vocab: dict[str, int], model_type: str, vocab_file: str
) -> tuple[list[CommandToken], int]:
    """The official GPT2BPETokenizer's command tokens for a vocabulary of ``len(vocab)`` entries."""
    n = len(vocab)
    if max(vocab.values(), default=-1) >= n:
        raise ValueError(f"{vocab_file}: ids are not 0..{n - 1} ({n} entries)")
    if model_type == "roberta":
        # RoBERTa's own specials serve as pad/eos/sep, CLS, MASK and UNK; four tokens appended.
        _require_entries(vocab, ("<s>", "</s>", "<mask>", "<unk>"), vocab_file)
        eos = vocab["</s>"]
        ids = {"pad": eos, "eos": eos, "sep": eos, "cls": vocab["<s>"], "mask": vocab["<mask>"]}
        ids |= {"unk": vocab["<unk>"], "sop": n, "eop": n + 1, "gmask": n + 2, "smask": n + 3}
        return command_layout(ids), n + 4
    eot = vocab.get(EOT)
    if eot is None:  # the official code requires it; we append it before the GLM tokens
        logger.warning("%s has no %s; it is appended at id %d", vocab_file, EOT, n)
        eot, n = n, n + 1
    appended = ("sop", "eop", "cls", "mask", "sep", "unk", "gmask", "smask")
    ids = {"pad": eot, "eos": eot} | {name: n + k for k, name in enumerate(appended)}
    return command_layout(ids), n + len(appended)


class GPT2BPETokenizer(_RustTokenizer):
    """Byte-level BPE (``vocab.json`` + ``merges.txt``) with the official command tokens of the
    ``gpt2`` or ``roberta`` model type; without files, the released ones of that type."""

    name = "GPT2BPETokenizer"

    def __init__(
        self,
        vocab_file: str | None = None,
        merge_file: str | None = None,
        model_type: str = "gpt2",
        block_mask_token: bool = False,
    ) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        if model_type not in GPT2_MODEL_TYPES:
            raise ValueError(
                f"GPT2BPETokenizer model type {model_type!r} is not one of {GPT2_MODEL_TYPES}"
            )
        if (vocab_file is None) != (merge_file is None):
            raise ValueError(
                f"GPT2BPETokenizer needs both --vocab-file and --merge-file (or neither, for the "
                f"bundled {model_type} files); got vocab_file={vocab_file!r}, "
                f"merge_file={merge_file!r}"
            )
        vocab_file = vocab_file or bundled_vocab_file(f"{model_type}-vocab.json")
        merge_file = merge_file or bundled_vocab_file(f"{model_type}-merges.txt")
        _require_files("GPT-2 BPE", vocab_file, merge_file)
        self._init_kwargs = dict(
            vocab_file=vocab_file,
            merge_file=merge_file,
            model_type=model_type,
            block_mask_token=block_mask_token,
        )
        self._source_files = {"vocab_file": vocab_file, "merge_file": merge_file}
        tok = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        # The official pattern is GPT-2's, without a prefix space: ByteLevel's default regex.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        vocab = tok.get_vocab(with_added_tokens=False)
        commands, vocab_size = _gpt2_commands(vocab, model_type, vocab_file)
        super().__init__(tok, commands, vocab_size, len(vocab), block_mask_token)


# The official names (its PRETRAINED_VOCAB_ARCHIVE_MAP).
BERT_MODEL_TYPES = tuple(
    f"bert-{name}" for name in ("base-uncased", "large-uncased", "base-cased", "large-cased")
) + ("bert-base-multilingual-uncased", "bert-base-multilingual-cased", "bert-base-chinese")
# The official repository ships one uncased vocabulary under both uncased names.
BUNDLED_BERT_VOCABS = {
    "bert-base-uncased": "bert-base-uncased-vocab.txt",
    "bert-large-uncased": "bert-base-uncased-vocab.txt",
}


def bert_lower_case(model_type: str) -> bool:
    """The official rule: lower-case (and strip accents) unless the name says cased or Chinese."""
    return not ("-cased" in model_type or "chinese" in model_type)


def bert_vocab_file(model_type: str) -> str:
    if model_type not in BERT_MODEL_TYPES:
        raise ValueError(f"BERT model type {model_type!r} is not one of {BERT_MODEL_TYPES}")
    if model_type not in BUNDLED_BERT_VOCABS:
        raise ValueError(
            f"no vocabulary for {model_type!r} is bundled (only {sorted(BUNDLED_BERT_VOCABS)}); "
            "pass its vocab.txt with --vocab-file"
        )
    return bundled_vocab_file(BUNDLED_BERT_VOCABS[model_type])


class BertWordPieceTokenizer(_RustTokenizer):
    """WordPiece from a BERT ``vocab.txt``: [PAD] (also eos), [CLS], [MASK], [UNK], [SEP] from the
    vocabulary, sop, eop, gMASK, sMASK appended after it, as the official code does."""

    name = "BertWordPieceLowerCase"
    _decode_separator = " "

    def __init__(
        self,
        vocab_file: str,
        lower_case: bool = True,
        name: str = "BertWordPieceLowerCase",
        block_mask_token: bool = False,
    ) -> None:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

        _require_files("BERT vocab", vocab_file)
        self._init_kwargs = dict(
            vocab_file=vocab_file,
            lower_case=lower_case,
            name=name,
            block_mask_token=block_mask_token,
        )
        self._source_files = {"vocab_file": vocab_file}
        self.name = name
        self.lower_case = lower_case
        vocab = models.WordPiece.read_file(vocab_file)
        in_vocab = ("[PAD]", "[CLS]", "[MASK]", "[UNK]", "[SEP]")
        _require_entries(vocab, in_vocab, vocab_file)
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True,
            handle_chinese_chars=True,
            strip_accents=lower_case,
            lowercase=lower_case,
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        n = len(vocab)
        ids = {t.strip("[]").lower(): vocab[t] for t in in_vocab} | {"eos": vocab["[PAD]"]}
        ids |= {"sop": n, "eop": n + 1, "gmask": n + 2, "smask": n + 3}
        # The official BERT tokens strip no whitespace (WordPiece ignores it anyway).
        commands = command_layout(ids, {**GLM_TEXTS, "pad": "[PAD]", "eos": "[PAD]"}, lstrip=())
        super().__init__(tok, commands, n + 4, n, block_mask_token)


# Texts a tokenizer.json may hold for a command token besides GLM's own, in the order new tokens
# are appended. The first one that is a special token is reused, else the first in the
# vocabulary, else GLM's text is appended: this gives the official ids for the GPT-2, RoBERTa
# and BERT tokenizer.json files.
HF_COMMAND_CANDIDATES: dict[str, tuple[str, ...]] = {
    "eos": ("</s>", "<|end_of_text|>", "<eos>", "[PAD]", "<pad>"),
    "sop": (),
    "eop": (),
    "cls": ("<s>", "<|begin_of_text|>", "<bos>"),
    "mask": ("<mask>",),
    "sep": ("<sep>", "</s>"),
    "unk": ("<unk>",),
    "gmask": (),
    "smask": (),
}


class HuggingFaceTokenizer(_RustTokenizer):
    """A ``tokenizer.json`` (or a directory holding one), read by the Rust ``tokenizers`` package;
    GLM's command tokens reuse its special tokens where ``HF_COMMAND_CANDIDATES`` finds them and
    are appended as special tokens otherwise (``[dBLOCK]``, when asked for, after them). pad is
    eos, as in every official GLM tokenizer. In the input, GLM's command texts and the reused
    tokens' own texts encode to the command ids."""

    name = "HuggingFaceTokenizer"

    def __init__(self, model_path: str, block_mask_token: bool = False) -> None:
        from tokenizers import AddedToken, Tokenizer, decoders

        path = model_path
        if os.path.isdir(model_path):
            path = os.path.join(model_path, "tokenizer.json")
        _require_files("tokenizer.json", path)
        self._init_kwargs = {"model_path": model_path, "block_mask_token": block_mask_token}
        self._source_files = {"tokenizer_file": path}
        tok = Tokenizer.from_file(path)
        vocab = tok.get_vocab(with_added_tokens=True)
        special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        num_text_ids = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        texts = {}
        for name, others in HF_COMMAND_CANDIDATES.items():
            candidates = (GLM_TEXTS[name], *others)
            found = [t for t in candidates if t in special] or [t for t in candidates if t in vocab]
            texts[name] = (found or candidates)[0]
        new = [t for t in dict.fromkeys(texts.values()) if t not in vocab]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        ids = {"pad": tok.token_to_id(texts["eos"])}
        ids |= {name: tok.token_to_id(text) for name, text in texts.items()}
        # GLM's texts always work; the reused tokens' own texts too (listed last: decode shows them).
        commands = command_layout(ids)
        commands += command_layout(
            {n: ids[n] for n, t in texts.items() if t != GLM_TEXTS[n]}, texts
        )
        if isinstance(tok.decoder, decoders.WordPiece):  # WordPiece pieces print space-separated
            self._decode_separator = " "
        logger.info("%s: GLM command tokens %s, appended %s", path, ids, new)
        vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(ids.values()) + 1)
        super().__init__(tok, commands, vocab_size, num_text_ids, block_mask_token)


# ---- Registry -----------------------------------------------------------------------------------

# TokenizerSpec fields that name files or options; the flag of each is "--" + dashed name.
_OPTIONS = (
    "tokenizer_model",
    "vocab_file",
    "merge_file",
    "tokenizer_model_type",
    "fix_command_token",
)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


@dataclass(frozen=True)
class TokenizerBuilder:
    """How one ``--tokenizer-type`` is built, and which spec fields it reads (setting any other
    draws a warning that it has no effect)."""

    build: Callable[[TokenizerSpec], GLMTokenizer]
    uses: frozenset[str]


def _need(spec: TokenizerSpec, field: str) -> str:
    value = getattr(spec, field)
    if not value:
        raise ValueError(f"tokenizer type {spec.tokenizer_type} needs {_flag(field)}")
    return value


# The sentencepiece types subclass this module's classes, so megatron_glm.data.sentencepiece imports
# this module; the builders below import that one only when called, so loading stays one-way.


def _build_sentencepiece(spec: TokenizerSpec) -> GLMTokenizer:
    from megatron_glm.data.sentencepiece import (
        SentencePieceTokenizer,
        sentencepiece_metadata_path,
    )

    model = _need(spec, "tokenizer_model")
    if os.path.isfile(model) and not os.path.isfile(sentencepiece_metadata_path(model)):
        logger.info("%s has no metadata file: command tokens appended as ChineseSPTokenizer", model)
        return _build_chinese_sp(spec)
    if spec.fix_command_token:
        logger.warning("--fix-command-token has no effect on %s (it has a metadata file)", model)
    return SentencePieceTokenizer(model, block_mask_token=spec.block_mask_token)


def _build_chinese_sp(spec: TokenizerSpec) -> GLMTokenizer:
    from megatron_glm.data.sentencepiece import ChineseSPTokenizer

    return ChineseSPTokenizer(
        spec.tokenizer_model,
        fix_command_token=spec.fix_command_token,
        block_mask_token=spec.block_mask_token,
    )


def _build_bert(spec: TokenizerSpec) -> GLMTokenizer:
    if spec.tokenizer_type == "BertWordPieceTokenizer":
        model_type = spec.tokenizer_model_type or "bert-large-uncased"  # the official default
        vocab_file = spec.vocab_file or bert_vocab_file(model_type)
        if model_type not in BERT_MODEL_TYPES:
            raise ValueError(f"BERT model type {model_type!r} is not one of {BERT_MODEL_TYPES}")
        lower_case = bert_lower_case(model_type)
    elif spec.tokenizer_type == "BertWordPieceLowerCase":
        vocab_file = spec.vocab_file or bert_vocab_file("bert-base-uncased")
        lower_case = True
    else:
        vocab_file, lower_case = _need(spec, "vocab_file"), False
    return BertWordPieceTokenizer(
        vocab_file,
        lower_case=lower_case,
        name=spec.tokenizer_type,
        block_mask_token=spec.block_mask_token,
    )


# Every type reads block_mask_token (it is not a flag of its own: --block-mask-prob sets it).
_SP = frozenset({"tokenizer_model", "fix_command_token"})
TOKENIZER_BUILDERS: dict[str, TokenizerBuilder] = {
    "SentencePieceTokenizer": TokenizerBuilder(_build_sentencepiece, _SP),
    "ChineseSPTokenizer": TokenizerBuilder(_build_chinese_sp, _SP),
    "GPT2BPETokenizer": TokenizerBuilder(
        lambda s: GPT2BPETokenizer(
            s.vocab_file,
            s.merge_file,
            s.tokenizer_model_type or "gpt2",
            block_mask_token=s.block_mask_token,
        ),
        frozenset({"vocab_file", "merge_file", "tokenizer_model_type"}),
    ),
    "BertWordPieceTokenizer": TokenizerBuilder(
        _build_bert, frozenset({"vocab_file", "tokenizer_model_type"})
    ),
    "BertWordPieceLowerCase": TokenizerBuilder(_build_bert, frozenset({"vocab_file"})),
    "BertWordPieceCase": TokenizerBuilder(_build_bert, frozenset({"vocab_file"})),
    "HuggingFaceTokenizer": TokenizerBuilder(
        lambda s: HuggingFaceTokenizer(
            _need(s, "tokenizer_model"), block_mask_token=s.block_mask_token
        ),
        frozenset({"tokenizer_model"}),
    ),
}


def tokenizer_from_spec(spec: TokenizerSpec) -> GLMTokenizer:
    """The tokenizer ``spec`` describes, built from local files (or the bundled vocabularies)."""
    builder = TOKENIZER_BUILDERS.get(spec.tokenizer_type)
    if builder is None:
        raise ValueError(
            f"unknown tokenizer type {spec.tokenizer_type!r}; choose from "
            f"{', '.join(TOKENIZER_BUILDERS)}"
        )
    for field in _OPTIONS:
        if getattr(spec, field) and field not in builder.uses:
            logger.warning(
                "%s has no effect on tokenizer type %s", _flag(field), spec.tokenizer_type
            )
    tokenizer = builder.build(spec)
    logger.debug("built %r", tokenizer)
    return tokenizer


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    tokenizer_model_type: str | None = None,
    fix_command_token: bool = False,
    block_mask_token: bool = False,
) -> GLMTokenizer:
    """The tokenizer named by ``tokenizer_type`` (Megatron's and the official GLM's names);
    ``block_mask_token`` adds ``[dBLOCK]`` (what ``--block-mask-prob`` > 0 asks for)."""
    return tokenizer_from_spec(
        TokenizerSpec(
            tokenizer_type=tokenizer_type,
            tokenizer_model=tokenizer_model,
            vocab_file=vocab_file,
            merge_file=merge_file,
            tokenizer_model_type=tokenizer_model_type,
            fix_command_token=fix_command_token,
            block_mask_token=block_mask_token,
        )
    )


# Names that moved to megatron_glm.data.sentencepiece but that a caller still imports from here
# (benchmarks/bench_preprocess.py). Resolved on first use: an import at load time would be
# circular.
# One builder per name the configuration accepts (the argparse choices come from the same tuple).
assert tuple(TOKENIZER_BUILDERS) == TOKENIZER_TYPES, (tuple(TOKENIZER_BUILDERS), TOKENIZER_TYPES)


# ---- which tokenizer a dataset was made with ---------------------------------------------------

DATASET_TOKENIZER_SUFFIX = ".tokenizer.json"


def write_dataset_tokenizer(prefix: str, tokenizer: GLMTokenizer, spec: TokenizerSpec) -> None:
    """Record next to ``prefix.bin/.idx`` the tokenizer that made it (its flags and identity)."""
    import json

    record = {
        "format": "megatron_glm.dataset_tokenizer",
        "version": 1,
        "flags": {k: v for k, v in dataclasses.asdict(spec).items() if v not in (None, False)},
        **tokenizer.identity(),
    }
    from megatron_glm.atomic_files import atomic_write_text

    atomic_write_text(Path(prefix + DATASET_TOKENIZER_SUFFIX), json.dumps(record, indent=1))


def dataset_tokenizer_problem(prefix: str, tokenizer: GLMTokenizer) -> str | None:
    """Why the dataset at ``prefix`` does not fit ``tokenizer`` (its ids would mean other tokens),
    from the record ``tools/preprocess_data.py`` wrote; None when it fits or there is no record
    (datasets made elsewhere, e.g. by Megatron, carry none)."""
    import json

    path = prefix + DATASET_TOKENIZER_SUFFIX
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return f"{path} cannot be read ({err}); remove it to skip the tokenizer check"
    ours = tokenizer.identity()
    differs = [key for key in ours if record.get(key) != ours[key]]
    if not differs:
        return None
    made_with = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in record.get("flags", {}).items())
    return (
        f"data prefix {prefix!r} was made with another tokenizer ({made_with or 'unknown flags'}; "
        f"differs in {', '.join(differs)}): preprocess it again with this run's tokenizer flags, "
        "or train with the ones it was made with"
    )
