"""The consolidated form (megatron_glm/conversion/consolidated.py) and GLMModel.from_pretrained.

The round trip starts from a checkpoint the real trainer saved at TP 2 x PP 2 (tests/conversion):
ours(TP 2, PP 2) -> consolidated -> ours(TP 1) -> consolidated keeps every tensor bitwise, and
the tokenizer travels with the weights (copied files, a spec naming them by relative name).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_glm.config import GLMConfig
from megatron_glm.conversion import deepspeed_form as ours
from megatron_glm.conversion import detect_form
from megatron_glm.conversion.canonical import (
    CanonicalCheckpoint,
    CheckpointError,
    canonical_names,
    cast_state,
)
from megatron_glm.conversion.consolidated import (
    CONFIG_FILE,
    FORM,
    TOKENIZER_CONFIG_FILE,
    WEIGHTS_FILE,
    tokenizer_spec,
)
from megatron_glm.data.tokenizers import tokenizer_from_spec
from megatron_glm.model import GLMModel
from tests.conversion import ITERATIONS, TrainedCheckpoints

TEXT = "Return the sum of the arguments, as in the Python documentation."


@pytest.fixture(scope="module")
def consolidated(trained: CanonicalCheckpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("consolidated") / "glm"
    FORM.write(trained, out)
    return out


def _assert_same(a: CanonicalCheckpoint, b: CanonicalCheckpoint) -> None:
    assert a.config == b.config
    assert list(a.state) == list(b.state)
    for name, tensor in a.state.items():
        assert b.state[name].dtype == tensor.dtype, name
        assert torch.equal(b.state[name], tensor), name


def test_round_trip_through_our_layouts_is_bitwise(
    trained: CanonicalCheckpoint, consolidated: Path, tmp_path: Path
) -> None:
    first = FORM.read(consolidated)
    _assert_same(trained, first)
    assert first.iteration == ITERATIONS
    ours.FORM.write(first, tmp_path / "tp1")
    assert ours.FORM.read(tmp_path / "tp1").extra["tensor_model_parallel_size"] == 1
    FORM.write(ours.FORM.read(tmp_path / "tp1"), tmp_path / "again")
    again = FORM.read(tmp_path / "again")
    again_model = (tmp_path / "again" / Path(first.tokenizer["tokenizer_model"]).name).resolve()
    assert again_model.is_file()
    _assert_same(trained, again)
    # the same spec, its file now the copy in the new directory
    assert again.tokenizer == {**first.tokenizer, "tokenizer_model": str(again_model)}


def test_layout_and_tokenizer_files(
    sources: TrainedCheckpoints, trained: CanonicalCheckpoint, consolidated: Path
) -> None:
    names = sorted(p.name for p in consolidated.iterdir())
    model = sources.corpus.tokenizer_model  # sp512.model, with its sp512.json metadata
    assert names == sorted(
        [CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_CONFIG_FILE, model.name, model.stem + ".json"]
    )
    assert json.loads((consolidated / CONFIG_FILE).read_text()) == trained.config.to_dict()
    recorded = json.loads((consolidated / TOKENIZER_CONFIG_FILE).read_text())
    assert recorded["tokenizer_model"] == model.name  # relative: the directory can move
    assert recorded["tokenizer_type"] == "SentencePieceTokenizer"
    moved = consolidated.parent / "moved"
    shutil.copytree(consolidated, moved)
    spec = tokenizer_spec(moved)
    assert spec is not None and spec.tokenizer_model == str(moved / model.name)
    original = tokenizer_from_spec(dataclasses.replace(spec, tokenizer_model=str(model)))
    copied = tokenizer_from_spec(spec)
    assert copied.encode(TEXT) == original.encode(TEXT)
    assert copied.command_tokens == original.command_tokens


def test_from_pretrained_gives_the_logits_of_the_canonical_state(
    trained: CanonicalCheckpoint, consolidated: Path
) -> None:
    model = GLMModel.from_pretrained(consolidated)
    assert not model.training
    reference = GLMModel(trained.config).eval()
    reference.load_state_dict(trained.state, strict=True)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, trained.config.vocab_size, (2, 24), generator=generator)
    positions = torch.stack([torch.arange(24), torch.zeros(24, dtype=torch.long)])
    positions = positions.unsqueeze(0).expand(2, 2, 24).contiguous()
    sep = torch.tensor([10, 16])
    with torch.no_grad():
        got = model(tokens, positions, sep)
        want = reference(tokens, positions, sep)
    assert torch.equal(got, want)
    # the partition attributes of the layers survive the meta-device build
    word = dict(model.named_parameters())["word_embeddings.weight"]
    assert word.tensor_model_parallel and word.partition_dim == 0
    half = GLMModel.from_pretrained(consolidated, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_bf16_output(trained: CanonicalCheckpoint, tmp_path: Path) -> None:
    half = dataclasses.replace(trained, state=cast_state(trained.state, torch.bfloat16))
    FORM.write(half, tmp_path / "bf16")
    back = FORM.read(tmp_path / "bf16")
    _assert_same(half, back)
    assert {t.dtype for t in back.state.values()} == {torch.bfloat16}


def test_detect_tells_it_from_a_hugging_face_directory(consolidated: Path, tmp_path: Path) -> None:
    assert detect_form(consolidated) == "consolidated"
    hf = tmp_path / "hf"
    shutil.copytree(consolidated, hf)
    config = json.loads((hf / CONFIG_FILE).read_text())
    (hf / CONFIG_FILE).write_text(json.dumps({**config, "model_type": "glm"}))
    assert not FORM.detect(hf)


def test_wrong_config_and_bad_weights_name_the_file(consolidated: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(consolidated, bad)
    config = json.loads((bad / CONFIG_FILE).read_text())
    (bad / CONFIG_FILE).write_text(json.dumps({**config, "ffn_hidden_size": 96}))
    with pytest.raises(CheckpointError) as err:
        FORM.read(bad)
    assert err.value.problems == [
        f"{bad / WEIGHTS_FILE}: transformer.layers.{i}.{name} has shape {shape}, the model "
        f"config expects {want}"
        for i in range(2)
        for name, shape, want in (
            ("mlp.dense_h_to_4h.weight", (128, 32), (96, 32)),
            ("mlp.dense_h_to_4h.bias", (128,), (96,)),
            ("mlp.dense_4h_to_h.weight", (32, 128), (32, 96)),
        )
    ]
    (bad / CONFIG_FILE).write_text(json.dumps({**config, "hidden_units": 32}))
    with pytest.raises(CheckpointError, match="unknown GLMConfig field"):
        FORM.read(bad)
    (bad / CONFIG_FILE).write_text(json.dumps(config))
    given = GLMConfig(**{**config, "num_layers": 3})
    with pytest.raises(CheckpointError, match="num_layers is 2, the given model config says 3"):
        FORM.read(bad, given)
    data = (bad / WEIGHTS_FILE).read_bytes()
    (bad / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        FORM.read(bad)
    assert err.value.problems[0].startswith(f"{bad / WEIGHTS_FILE}: cannot be read")


def test_from_pretrained_is_strict(
    trained: CanonicalCheckpoint, consolidated: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    extra = tmp_path / "extra"
    shutil.copytree(consolidated, extra)
    state = load_file(str(extra / WEIGHTS_FILE))
    state["lm_head.weight"] = state["word_embeddings.weight"].clone()
    del state["transformer.final_layernorm.bias"]
    save_file(state, str(extra / WEIGHTS_FILE))
    with pytest.raises(CheckpointError) as err:
        GLMModel.from_pretrained(extra)
    text = "\n".join(err.value.problems)
    assert "missing 1 tensor(s): transformer.final_layernorm.bias" in text
    assert "1 unexpected tensor(s): lm_head.weight" in text
    assert len(canonical_names(trained.config)) == len(trained.state)


def test_write_refuses_a_layout(trained: CanonicalCheckpoint, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="TP = PP = 1"):
        FORM.write(trained, tmp_path / "x", tensor_parallel=2)
    assert not (tmp_path / "x").exists()


def test_tokenizer_file_names_that_collide_with_ours(
    sources: TrainedCheckpoints, trained: CanonicalCheckpoint, tmp_path: Path
) -> None:
    # a sentencepiece model named config.model has its metadata in config.json
    src = tmp_path / "src"
    src.mkdir()
    model = sources.corpus.tokenizer_model
    shutil.copy(model, src / "config.model")
    shutil.copy(model.with_suffix(".json"), src / "config.json")
    spec = {**(trained.tokenizer or {}), "tokenizer_model": str(src / "config.model")}
    FORM.write(dataclasses.replace(trained, tokenizer=spec), tmp_path / "out")
    out = tmp_path / "out"
    assert json.loads((out / CONFIG_FILE).read_text()) == trained.config.to_dict()
    recorded = json.loads((out / TOKENIZER_CONFIG_FILE).read_text())
    assert recorded["tokenizer_model"] == "tokenizer.model"
    assert (out / "tokenizer.json").read_bytes() == model.with_suffix(".json").read_bytes()
    assert FORM.read(out).tokenizer["tokenizer_model"] == str((out / "tokenizer.model").resolve())
