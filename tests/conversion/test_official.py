"""The official GLM checkpoint layout (megatron_glm/conversion/official.py): exact names and
TP-partitioned shapes at TP 1, 2 and 4 (checked against partition rules written out here, not
against canonical.py), bitwise read-back and resharding, logits, the released and DeepSpeed-saved
variants, and bad input (wrong config, missing/extra/disagreeing/truncated shards, pickle payloads).

The official code itself was run by hand on these exports (docs/checkpoints.md#official-glm-checkpoint-layout):
its GLMModel loads them with strict=True at TP 1, 2 and 4 and its change_mp.py reshards them.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_glm import GLMConfig, GLMModel
from megatron_glm.conversion import detect_form
from megatron_glm.conversion.canonical import CanonicalCheckpoint, CheckpointError
from megatron_glm.conversion.official import FORM

TOKENIZER = {
    "tokenizer_type": "BertWordPieceTokenizer",
    "tokenizer_model_type": "bert-base-uncased",
}


def tiny_config(**overrides: object) -> GLMConfig:
    # vocab 1000 pads to 1024 (the official rule: the next multiple of 128, TP not involved)
    values: dict[str, object] = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=1000,
        max_sequence_length=32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    values.update(overrides)
    return GLMConfig(**values)  # type: ignore[arg-type]


def make_checkpoint(config: GLMConfig | None = None, seed: int = 0) -> CanonicalCheckpoint:
    """A model's state with every tensor perturbed (LayerNorms and biases included), so a wrong
    slice or a swapped tensor cannot go unnoticed."""
    config = config or tiny_config()
    model = GLMModel(config)
    generator = torch.Generator().manual_seed(seed)
    state = {
        name: (t + 0.05 * torch.randn(t.shape, generator=generator)).detach()
        for name, t in model.state_dict().items()
    }
    return CanonicalCheckpoint(config, state, iteration=1234, tokenizer=dict(TOKENIZER))


def sample_batch(config: GLMConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    b, s = 2, 20
    input_ids = torch.randint(0, 1000, (b, s), generator=generator)  # any tiny vocab
    sep = torch.tensor([8, 13])
    position = torch.arange(s).repeat(b, 1)
    block = torch.zeros(b, s, dtype=torch.long)
    for i in range(b):  # Part B: the [MASK]'s position, block positions 1..
        position[i, sep[i] :] = 2
        block[i, sep[i] :] = torch.arange(1, s - int(sep[i]) + 1)
    return input_ids, torch.stack([position, block], 1), sep


def logits_of(config: GLMConfig, state: dict[str, torch.Tensor]) -> torch.Tensor:
    model = GLMModel(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        return model(*sample_batch(config))


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def expected_rank_slice(name: str, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """TP rank ``rank``'s piece of ``full``, by the official partition rules (as the official
    change_mp.py cuts them): word table, dense_h_to_4h: rows; attention.dense, dense_4h_to_h
    weights: columns; query_key_value: its heads' rows of each of Q, K and V; the rest whole."""
    if "query_key_value" in name:
        third = full.shape[0] // 3
        part = third // tp
        return torch.cat(
            [full[j * third + rank * part : j * third + (rank + 1) * part] for j in range(3)]
        )
    if name == "word_embeddings.weight" or "dense_h_to_4h" in name:
        part = full.shape[0] // tp
        return full[rank * part : (rank + 1) * part]
    if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
        part = full.shape[1] // tp
        return full[:, rank * part : (rank + 1) * part]
    return full


def write(
    tmp_path: Path, checkpoint: CanonicalCheckpoint, tp: int, name: str = "out", **kw
) -> Path:
    out = tmp_path / name
    FORM.write(checkpoint, out, tensor_parallel=tp, **kw)
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_export_has_the_canonical_names_and_partitioned_shapes(tmp_path: Path, tp: int) -> None:
    checkpoint = make_checkpoint()
    out = write(tmp_path, checkpoint, tp)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    shard_names = [f"release/mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
    assert files == sorted(["latest", "latest_checkpointed_iteration.txt", "release", *shard_names])
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert (out / "latest").read_text().strip() == "release"
    names = list(checkpoint.state)
    padded_rows = 0
    for rank in range(tp):
        saved = torch.load(out / shard_names[rank], weights_only=True)
        assert saved["iteration"] == 1234
        module = saved["module"]
        assert list(module) == names  # exactly the canonical names, in model order
        for name, full in checkpoint.state.items():
            want = expected_rank_slice(name, full, rank, tp)
            assert module[name].shape == want.shape, (name, rank)
            assert torch.equal(module[name], want), (name, rank)
        padded_rows += module["word_embeddings.weight"].shape[0]
    # the padded vocabulary is the official one (multiple of 128, independent of TP)
    assert padded_rows == checkpoint.config.padded_vocab_size == 1024


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_read_back_is_bitwise(tmp_path: Path, tp: int) -> None:
    checkpoint = make_checkpoint()
    out = write(tmp_path, checkpoint, tp)
    for path in (out, out / "release", out / "release" / "mp_rank_00_model_states.pt"):
        if path.is_file() and tp > 1:
            continue
        back = FORM.read(path)
        assert_same_state(back.state, checkpoint.state)
        assert back.config == checkpoint.config
        assert back.iteration == 1234
        assert back.tokenizer == TOKENIZER
        assert back.extra["tensor_parallel"] == tp


def test_tp2_read_write_tp4_is_bitwise_and_logits_agree(tmp_path: Path) -> None:
    checkpoint = make_checkpoint()
    tp2 = FORM.read(write(tmp_path, checkpoint, 2, "tp2"))
    assert_same_state(tp2.state, checkpoint.state)
    tp4 = FORM.read(write(tmp_path, tp2, 4, "tp4"))
    assert_same_state(tp4.state, checkpoint.state)
    want = logits_of(checkpoint.config, checkpoint.state)
    got = logits_of(tp4.config, tp4.state)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, want)  # the same tensors give the same numbers


def test_padded_vocab_matches_the_official_rule_for_every_tp() -> None:
    for vocab in (1000, 30522 + 70, 50257 + 47, 50000 + 48, 128, 129):
        official = vocab
        while official % 128:  # configure_data.py of the official code: no TP factor
            official += 1
        config = tiny_config(vocab_size=vocab)
        assert config.padded_vocab_size == official
        assert all(official % tp == 0 for tp in (1, 2, 4))


def test_iteration_tag_and_deepspeed_tracker(tmp_path: Path) -> None:
    checkpoint = make_checkpoint()
    out = write(tmp_path, checkpoint, 2, tag="300")
    assert (out / "300" / "mp_rank_01_model_states.pt").is_file()
    (out / "latest_checkpointed_iteration.txt").unlink()  # DeepSpeed's tracker alone still names it
    back = FORM.read(out)
    assert back.iteration == 300
    assert_same_state(back.state, checkpoint.state)


def released_style(tmp_path: Path, checkpoint: CanonicalCheckpoint, tp: int) -> Path:
    """Files as the released weights ship: ``{"module": ...}`` only, no architecture."""
    out = write(tmp_path, checkpoint, tp, "ours")
    released = tmp_path / "released"
    (released / "release").mkdir(parents=True)
    for file in sorted((out / "release").iterdir()):
        torch.save(
            {"module": torch.load(file, weights_only=True)["module"]},
            released / "release" / file.name,
        )
    (released / "latest_checkpointed_iteration.txt").write_text("release")
    return released


def test_released_layout_infers_the_architecture(tmp_path: Path) -> None:
    config = tiny_config(hidden_size=128, num_attention_heads=2, ffn_hidden_size=384)
    checkpoint = make_checkpoint(config)
    released = released_style(tmp_path, checkpoint, 2)
    back = FORM.read(released)
    assert_same_state(back.state, checkpoint.state)
    assert back.iteration is None
    inferred = back.config
    assert (inferred.num_layers, inferred.hidden_size, inferred.num_attention_heads) == (2, 128, 2)
    assert (inferred.padded_vocab_size, inferred.vocab_size) == (1024, 1024)  # the table's rows
    assert (inferred.max_sequence_length, inferred.ffn_hidden_size) == (32, 384)
    assert "num_attention_heads" in back.extra["assumed"]
    # with the real config nothing is assumed and the tokenizer's vocab size is kept
    exact = FORM.read(released, config)
    assert exact.config == config and "assumed" not in exact.extra
    assert_same_state(exact.state, checkpoint.state)
    # head dim 64 cannot fit hidden 64 at TP 2 (1 head): the config is required, and said so
    small = released_style(tmp_path / "small", make_checkpoint(), 2)
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        FORM.read(small)


class LossScalerStandIn:
    """Plays the official fp16 DynamicLossScaler object a DeepSpeed-saved file pickles."""

    def __init__(self) -> None:
        self.cur_scale = 4096.0


class Payload:
    """Unpickling this creates ``marker`` (``open(marker, "w")``): it must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def test_deepspeed_saved_variant_reads_only_the_module(tmp_path: Path, caplog) -> None:
    checkpoint = make_checkpoint()
    out = write(tmp_path, checkpoint, 2)
    marker = tmp_path / "marker"
    for file in (out / "release").iterdir():
        saved = torch.load(file, weights_only=True)
        del saved["megatron_glm"]
        saved.update(  # what the official trainer's DeepSpeed engine adds (utils.save_ds_checkpoint)
            optimizer=None,
            lr_scheduler=None,
            mp_world_size=2,
            dp_world_size=8,
            global_steps=1234,
            ds_config={"train_micro_batch_size_per_gpu": 4},
            args=argparse.Namespace(num_layers=2, hidden_size=64),
            np_rng_state=np.random.get_state(),
            random_rng_state=(3, tuple(range(5)), None),
            loss_scaler=LossScalerStandIn(),
            client_state=Payload(marker),
        )
        saved["module"] = {"module": saved["module"]}  # nested, as a wrapper would leave it
        torch.save(saved, file)
    with pytest.raises(pickle.UnpicklingError):  # weights_only alone refuses these files
        torch.load(out / "release" / "mp_rank_00_model_states.pt", weights_only=True)
    with caplog.at_level(logging.WARNING):
        back = FORM.read(out, checkpoint.config)
    assert_same_state(back.state, checkpoint.state)
    assert not marker.exists()
    assert "argparse.Namespace" in caplog.text and "without loading them" in caplog.text


def test_pickle_payload_inside_module_is_refused_and_never_runs(tmp_path: Path) -> None:
    checkpoint = make_checkpoint()
    out = write(tmp_path, checkpoint, 1)
    file = out / "release" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "marker"
    saved = torch.load(file, weights_only=True)
    saved["module"]["transformer.final_layernorm.bias"] = Payload(marker)
    torch.save(saved, file)
    # the payload is live: a plain unpickle would run it
    live = tmp_path / "live.pt"
    torch.save({"x": Payload(tmp_path / "live_marker")}, live)
    torch.load(live, weights_only=False)
    assert (tmp_path / "live_marker").exists()

    with pytest.raises(CheckpointError, match="pickled Python objects") as err:
        FORM.read(out, checkpoint.config)
    assert str(file) in str(err.value) and "io.open" in str(
        err.value
    )  # what pickle records for open
    assert not marker.exists()


def test_wrong_config_lists_every_field(tmp_path: Path) -> None:
    checkpoint = make_checkpoint()
    out = write(tmp_path, checkpoint, 2)
    wrong = tiny_config(num_layers=3, max_sequence_length=64)
    with pytest.raises(CheckpointError) as err:
        FORM.read(out, wrong)
    message = str(err.value)
    assert str(out / "release") in message
    assert "num_layers: the given model config says 3, the checkpoint has 2" in message
    assert "max_sequence_length: the given model config says 64, the checkpoint has 32" in message
    with pytest.raises(CheckpointError, match="hidden_size"):
        FORM.read(out, tiny_config(hidden_size=128, num_attention_heads=2))


def test_missing_and_extra_shards(tmp_path: Path) -> None:
    checkpoint = make_checkpoint()
    out = write(tmp_path, checkpoint, 2)
    tag_dir = out / "release"
    shutil.copy(tag_dir / "mp_rank_01_model_states.pt", tag_dir / "mp_rank_02_model_states.pt")
    with pytest.raises(CheckpointError, match="mp_rank_02_model_states.pt is there too") as err:
        FORM.read(out)
    assert str(tag_dir) in str(err.value)
    (tag_dir / "mp_rank_02_model_states.pt").unlink()
    (tag_dir / "mp_rank_01_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="mp_rank_01_model_states.pt is missing") as err:
        FORM.read(out)
    assert "TP 2" in str(err.value) and str(tag_dir) in str(err.value)
    # one rank's file on its own is not a TP=1 checkpoint
    with pytest.raises(CheckpointError, match="one TP rank of a TP 2 checkpoint"):
        FORM.read(tag_dir / "mp_rank_00_model_states.pt")


def test_tp_files_that_disagree_on_a_replicated_tensor(tmp_path: Path) -> None:
    checkpoint = make_checkpoint()
    out = write(tmp_path, checkpoint, 2)
    file = out / "release" / "mp_rank_01_model_states.pt"
    saved = torch.load(file, weights_only=True)
    saved["module"]["transformer.layers.1.post_attention_layernorm.weight"][3] += 1.0
    torch.save(saved, file)
    with pytest.raises(CheckpointError) as err:
        FORM.read(out)
    message = str(err.value)
    assert str(file) in message
    assert "transformer.layers.1.post_attention_layernorm.weight differs" in message


def test_wrong_shard_shape_names_the_file(tmp_path: Path) -> None:
    checkpoint = make_checkpoint()
    out = write(tmp_path, checkpoint, 2)
    file = out / "release" / "mp_rank_01_model_states.pt"
    saved = torch.load(file, weights_only=True)
    saved["module"]["transformer.layers.0.mlp.dense_4h_to_h.weight"] = torch.zeros(64, 256)
    torch.save(saved, file)
    with pytest.raises(CheckpointError, match="dense_4h_to_h.weight has shape") as err:
        FORM.read(out)
    assert str(file) in str(err.value)


def test_truncated_file(tmp_path: Path) -> None:
    checkpoint = make_checkpoint()
    out = write(tmp_path, checkpoint, 2)
    file = out / "release" / "mp_rank_01_model_states.pt"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        FORM.read(out)
    assert str(file) in str(err.value)


def test_write_refuses_bad_requests_and_leaves_nothing(tmp_path: Path) -> None:
    checkpoint = make_checkpoint()
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="pipeline"):
        FORM.write(checkpoint, out, pipeline_parallel=2)
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        FORM.write(checkpoint, out, tensor_parallel=3)
    with pytest.raises(CheckpointError, match="tag"):
        FORM.write(checkpoint, out, tag="latest")
    broken = CanonicalCheckpoint(checkpoint.config, dict(checkpoint.state))
    del broken.state["transformer.final_layernorm.bias"]
    with pytest.raises(CheckpointError, match="final_layernorm.bias"):
        FORM.write(broken, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        FORM.write(checkpoint, out)


def test_detect(tmp_path: Path) -> None:
    out = write(tmp_path, make_checkpoint(), 2)
    assert FORM.detect(out) and FORM.detect(out / "release")
    assert FORM.detect(out / "release" / "mp_rank_00_model_states.pt")
    assert detect_form(out) == "official"
    ours = tmp_path / "ours"  # one of our training checkpoints: same names plus our metadata
    shutil.copytree(out, ours)
    (ours / "release" / "megatron_glm_meta.json").write_text("{}")
    assert not FORM.detect(ours) and not FORM.detect(ours / "release")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not FORM.detect(empty)
    loose = tmp_path / "loose"  # no tracker: a single release/<n> directory is found
    (loose / "release").mkdir(parents=True)
    shutil.copy(out / "release" / "mp_rank_00_model_states.pt", loose / "release")
    shutil.copy(out / "release" / "mp_rank_01_model_states.pt", loose / "release")
    assert FORM.detect(loose)
    assert_same_state(FORM.read(loose).state, make_checkpoint().state)


def test_wrapper_prefixes_and_a_disagreeing_mp_world_size(tmp_path: Path) -> None:
    checkpoint = make_checkpoint()
    out = write(tmp_path, checkpoint, 2)
    for file in (out / "release").iterdir():
        saved = torch.load(file, weights_only=True)
        saved["module"] = {"module." + k: v for k, v in saved["module"].items()}  # DDP-style
        torch.save(saved, file)
    assert_same_state(FORM.read(out).state, checkpoint.state)
    file = out / "release" / "mp_rank_00_model_states.pt"
    saved = torch.load(file, weights_only=True)
    saved["mp_world_size"] = 4
    torch.save(saved, file)
    with pytest.raises(CheckpointError, match="mp_world_size 4, its tensor shapes say TP 2") as err:
        FORM.read(out)
    assert str(file) in str(err.value)
