"""The Hugging Face hub layout of THUDM's glm-* models (megatron_glm/conversion/hf.py):
config.json equal to the released repositories' files, "glm."-prefixed safetensors, bitwise
read-back, the pytorch_model.bin and unprefixed variants, logits, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_glm import GLMConfig
from megatron_glm.conversion import detect_form
from megatron_glm.conversion.canonical import CanonicalCheckpoint, CheckpointError
from megatron_glm.conversion.hf import FORM, config_from_hf, hf_config
from tests.conversion.test_official import (
    TOKENIZER,
    Payload,
    assert_same_state,
    logits_of,
    make_checkpoint,
    tiny_config,
)

# The released config.json files, copied from the Hugging Face hub (THUDM/glm-10b at main and
# THUDM/glm-large-chinese at main). THUDM/glm-2b, glm-roberta-large and
# glm-10b-chinese have the same keys and constants (glm-2b adds AutoModelForSequenceClassification
# to auto_map; glm-10b-chinese swaps MultipleChoice for it and adds "bad_words_id"). Note the
# released "architectures" is ["GLMModel"] and torch_dtype "float32" even where the weights are
# fp16; vocab_size is the padded table (50304, 50048, 30592).
_RELEASED_AUTO_MAP = {
    "AutoConfig": "configuration_glm.GLMConfig",
    "AutoModel": "modeling_glm.GLMModel",
    "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration",
    "AutoModelForMultipleChoice": "modeling_glm.GLMForMultipleChoice",
}
_RELEASED_CONSTANTS = {
    "architectures": ["GLMModel"],
    "attention_dropout_prob": 0.1,
    "attention_scale": 1.0,
    "auto_map": _RELEASED_AUTO_MAP,
    "block_position_encoding": True,
    "checkpoint_activations": False,
    "checkpoint_num_layers": 1,
    "embedding_dropout_prob": 0.1,
    "initializer_range": 0.02,
    "model_type": "glm",
    "output_dropout_prob": 0.1,
    "output_predict": True,
    "parallel_output": True,
    "pool_token": "cls",
    "relative_encoding": False,
    "spell_func": "lstm",
    "spell_length": None,
    "torch_dtype": "float32",
    "transformers_version": "4.23.1",
}
RELEASED_GLM_10B = {
    "_name_or_path": "THUDM/glm-10b",
    **_RELEASED_CONSTANTS,
    "hidden_size": 4096,
    "max_sequence_length": 1024,
    "num_attention_heads": 64,
    "num_layers": 48,
    "vocab_size": 50304,
}
RELEASED_GLM_LARGE_CHINESE = {
    "_name_or_path": "THUDM/glm-large-chinese",
    **_RELEASED_CONSTANTS,
    "hidden_size": 1024,
    "max_sequence_length": 1024,
    "num_attention_heads": 16,
    "num_layers": 24,
    "vocab_size": 50048,
}


def test_config_json_reproduces_the_released_files() -> None:
    ten_b = GLMConfig.from_preset("10b")
    assert hf_config(ten_b, "THUDM/glm-10b", torch.float32) == RELEASED_GLM_10B
    large_chinese = GLMConfig(
        num_layers=24,
        hidden_size=1024,
        num_attention_heads=16,
        vocab_size=50000 + 48,  # the Chinese SentencePiece vocabulary with GLM's added tokens
        max_sequence_length=1024,
    )
    assert (
        hf_config(large_chinese, "THUDM/glm-large-chinese", torch.float32)
        == RELEASED_GLM_LARGE_CHINESE
    )
    # and back: the released file gives our config (vocab_size is the padded table)
    back = config_from_hf(RELEASED_GLM_10B, "glm-10b/config.json")
    assert back == GLMConfig.from_preset("10b")
    back = config_from_hf({**RELEASED_GLM_10B, "bad_words_id": [50009]}, "glm-10b-chinese")
    assert back.padded_vocab_size == 50304


def test_export_files_names_and_config(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tiny_config(hidden_dropout=0.1, attention_dropout=0.1))
    out = tmp_path / "glm-tiny"
    FORM.write(checkpoint, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    written = json.loads((out / "config.json").read_text())
    assert set(written) == set(RELEASED_GLM_10B)
    for key, value in _RELEASED_CONSTANTS.items():
        assert written[key] == value, key
    assert written["_name_or_path"] == "glm-tiny"
    assert (written["num_layers"], written["hidden_size"], written["num_attention_heads"]) == (
        2,
        64,
        4,
    )
    assert (written["vocab_size"], written["max_sequence_length"]) == (1024, 32)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in names}
    assert sorted(names) == sorted("glm." + name for name in checkpoint.state)
    for name, tensor in checkpoint.state.items():
        assert shapes["glm." + name] == tuple(tensor.shape)


def test_read_back_is_bitwise_and_logits_agree(tmp_path: Path) -> None:
    checkpoint = make_checkpoint()
    FORM.write(checkpoint, tmp_path / "hf")
    back = FORM.read(tmp_path / "hf")
    assert_same_state(back.state, checkpoint.state)
    assert back.config == checkpoint.config
    assert (back.iteration, back.tokenizer) == (1234, TOKENIZER)
    assert detect_form(tmp_path / "hf") == "hf"
    assert torch.equal(
        logits_of(back.config, back.state), logits_of(checkpoint.config, checkpoint.state)
    )
    half = CanonicalCheckpoint(
        checkpoint.config, {k: v.to(torch.bfloat16) for k, v in checkpoint.state.items()}
    )
    FORM.write(half, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert_same_state(FORM.read(tmp_path / "bf16").state, half.state)


def released_repo(tmp_path: Path, checkpoint: CanonicalCheckpoint, prefix: str) -> Path:
    """A directory as a THUDM/glm-* repository holds it: released-style config.json and a
    pytorch_model.bin state dict (no megatron_glm metadata)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    config = hf_config(checkpoint.config, "THUDM/glm-tiny", torch.float32)
    (repo / "config.json").write_text(json.dumps(config, indent=2))
    torch.save({prefix + k: v for k, v in checkpoint.state.items()}, repo / "pytorch_model.bin")
    return repo


@pytest.mark.parametrize("prefix", ["glm.", ""])
def test_pytorch_model_bin_variant(tmp_path: Path, prefix: str) -> None:
    checkpoint = make_checkpoint()
    repo = released_repo(tmp_path, checkpoint, prefix)
    assert detect_form(repo) == "hf"
    back = FORM.read(repo)
    assert_same_state(back.state, checkpoint.state)
    # config.json holds the padded table size only: vocab_size becomes 1024
    assert back.config.vocab_size == back.config.padded_vocab_size == 1024
    assert back.config.num_attention_heads == 4 and back.iteration is None
    # with our config the tokenizer's vocab size is kept
    assert FORM.read(repo, checkpoint.config).config == checkpoint.config
    assert torch.equal(
        logits_of(back.config, back.state)[..., :1000],
        logits_of(checkpoint.config, checkpoint.state)[..., :1000],
    )


def test_write_refuses_tp_pp_and_unrepresentable_models(tmp_path: Path) -> None:
    checkpoint = make_checkpoint()
    with pytest.raises(CheckpointError, match="must be 1"):
        FORM.write(checkpoint, tmp_path / "a", tensor_parallel=2)
    with pytest.raises(CheckpointError, match="must be 1"):
        FORM.write(checkpoint, tmp_path / "a", pipeline_parallel=2)
    odd = make_checkpoint(tiny_config(ffn_hidden_size=128, layernorm_epsilon=1e-6))
    with pytest.raises(CheckpointError) as err:
        FORM.write(odd, tmp_path / "a")
    assert "ffn_hidden_size 128" in str(err.value) and "layernorm_epsilon" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_input(tmp_path: Path) -> None:
    checkpoint = make_checkpoint()
    out = tmp_path / "hf"
    FORM.write(checkpoint, out)
    with pytest.raises(CheckpointError) as err:
        FORM.read(out, tiny_config(num_layers=3, num_attention_heads=8))
    assert "num_layers: the given model config says 3, config.json has 2" in str(err.value)
    assert "num_attention_heads: the given model config says 8, config.json has 4" in str(err.value)

    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "relative_encoding": True}))
    with pytest.raises(CheckpointError, match="relative_encoding"):
        FORM.read(out)
    (out / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(CheckpointError, match="num_layers"):
        FORM.read(out)  # the metadata config and config.json disagree
    (out / "config.json").write_text(json.dumps(config))

    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        FORM.read(out)
    assert str(weights) in str(err.value)


def test_pickle_payload_in_pytorch_model_bin_never_runs(tmp_path: Path) -> None:
    checkpoint = make_checkpoint()
    repo = released_repo(tmp_path, checkpoint, "glm.")
    marker = tmp_path / "marker"
    state = torch.load(repo / "pytorch_model.bin", weights_only=True)
    state["glm.transformer.final_layernorm.bias"] = Payload(marker)
    torch.save(state, repo / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled Python objects") as err:
        FORM.read(repo)
    assert str(repo / "pytorch_model.bin") in str(err.value)
    assert not marker.exists()


def test_detect_tells_hf_from_a_plain_config_json(tmp_path: Path) -> None:
    plain = tmp_path / "plain"  # config.json with our GLMConfig fields, as the consolidated form
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    (plain / "model.safetensors").write_bytes(b"")
    assert not FORM.detect(plain)
    assert not FORM.detect(tmp_path / "missing")
