"""Our training checkpoints as a checkpoint form (megatron_glm/conversion/deepspeed_form.py).

Sources are real: checkpoints the trainer saved at TP 2 x PP 2 and TP 2 x PP 1 (tests/conversion).
Reading is checked against the files themselves (the merged tensors are the TP slices put back
together) and across layouts (the two runs start from the same (seed, name) weights, so two
iterations leave them within a few learning rates of each other, while a wrongly mapped tensor is
off by the initial weights' scale); writing is checked against the files DeepSpeed wrote (same
file names, keys and bitwise tensors) and by reading back at TP 1, 2, 4 and PP 1, 2.

A ZeRO stage 3 checkpoint (a TP 2 run in bf16) keeps no weights in DeepSpeed's module files; its
weights are read from the fp32 masters of its layout-free state and must equal, bitwise, the
module weights the run ended with (gathered from ZeRO 3's partitions by a hook in the run), also
after tools/convert_checkpoint.py takes it to the consolidated form.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from megatron_glm.conversion import consolidated, detect_form
from megatron_glm.conversion.canonical import (
    CanonicalCheckpoint,
    CheckpointError,
    canonical_names,
    merge_shards,
)
from megatron_glm.conversion.deepspeed_form import FORM, layer_file_name, module_file_name
from megatron_glm.model import GLMModel
from megatron_glm.parallel.utils import gather_tensor_shards
from megatron_glm.training.checkpointing import COMPLETE_MARKER, META_FILE
from megatron_glm.training.pipeline import (
    TIED_MODULE_PREFIX,
    canonical_name,
    module_canonical_name,
    pipeline_location,
)
from megatron_glm.training.reshard import LAYOUT_FREE_DIR, rank_file_name
from tests.conversion import ITERATIONS, TrainedCheckpoints, Zero3Checkpoint
from tests.tools.cli import REPO


@pytest.fixture(scope="module")
def pp2(trained: CanonicalCheckpoint) -> CanonicalCheckpoint:
    return trained  # the name these tests use: read from the TP 2 x PP 2 run


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _problems(err: pytest.ExceptionInfo[CheckpointError]) -> str:
    return "\n".join(err.value.problems)


def test_pipeline_name_rule(pp2: CanonicalCheckpoint) -> None:
    """pipeline.py's one rule: canonical name <-> (layer index, local name) <-> the
    PipelineModule's parameter names."""
    n = pp2.config.num_layers
    assert pipeline_location("word_embeddings.weight", n) == (0, "word_embeddings.weight")
    assert pipeline_location("transformer.layers.1.mlp.dense_h_to_4h.bias", n) == (
        2,
        "mlp.dense_h_to_4h.bias",
    )
    assert pipeline_location("transformer.final_layernorm.weight", n) == (
        n + 1,
        "final_layernorm.weight",
    )
    assert canonical_name(n + 2, "word_embeddings.weight", n) == "word_embeddings.weight"
    for name in canonical_names(pp2.config):
        index, local = pipeline_location(name, n)
        assert canonical_name(index, local, n) == name
        module_name = f"{TIED_MODULE_PREFIX}{local}" if index == 0 else f"{index}.{local}"
        assert module_canonical_name(module_name, n) == name
    for bad in ("0.word_embeddings.weight", f"{n + 2}.word_embeddings.weight", "loss_fn.x"):
        with pytest.raises(ValueError, match="has no canonical name"):
            module_canonical_name(bad, n)
    with pytest.raises(ValueError, match="has no layer"):
        canonical_name(n + 3, "x", n)


def test_detect_root_and_tag_directory(sources: TrainedCheckpoints, tmp_path: Path) -> None:
    tag = sources.tp2_pp2 / str(ITERATIONS)
    assert detect_form(sources.tp2_pp2) == "deepspeed"
    assert detect_form(tag) == "deepspeed"
    # a --save directory whose only save did not finish holds no checkpoint
    root = _copy(sources.tp2_pp1, tmp_path)
    (root / str(ITERATIONS) / COMPLETE_MARKER).unlink()
    assert not FORM.detect(root)
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        FORM.read(root / str(ITERATIONS))


def test_read_reassembles_the_pipeline_and_tp_files(
    sources: TrainedCheckpoints, pp2: CanonicalCheckpoint
) -> None:
    config = pp2.config
    assert list(pp2.state) == canonical_names(config)
    assert pp2.iteration == ITERATIONS
    assert pp2.extra == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}
    assert pp2.tokenizer is not None
    assert pp2.tokenizer["tokenizer_model"] == str(sources.corpus.tokenizer_model)
    tag = sources.tp2_pp2 / str(ITERATIONS)
    # the word table: vocab rows split over TP in layer 0
    embedding = [_load(tag / layer_file_name(0, r)) for r in range(2)]
    assert torch.equal(
        pp2.state["word_embeddings.weight"],
        torch.cat([e["word_embeddings.weight"] for e in embedding]),
    )
    # layer 1 is pipeline layer 2; Q/K/V rows are strided over TP
    layer = [_load(tag / layer_file_name(2, r)) for r in range(2)]
    qkv = [x["attention.query_key_value.weight"] for x in layer]
    assert torch.equal(
        pp2.state["transformer.layers.1.attention.query_key_value.weight"],
        gather_tensor_shards(qkv, 0, 3),
    )
    final = _load(tag / layer_file_name(config.num_layers + 1, 1))
    assert torch.equal(pp2.state["transformer.final_layernorm.bias"], final["final_layernorm.bias"])


def test_two_layouts_of_the_same_run_agree(
    sources: TrainedCheckpoints, pp2: CanonicalCheckpoint
) -> None:
    pp1 = FORM.read(sources.tp2_pp1)
    assert pp1.config == pp2.config
    # same initial weights, two AdamW steps of lr <= 1e-3 each: the layouts drift by a few lr
    drift = max((pp1.state[n] - pp2.state[n]).abs().max().item() for n in pp1.state)
    assert drift < 5e-3
    # the test can fail: Q/K/V put back without the stride is off by the weights' own scale
    name = "transformer.layers.0.attention.query_key_value.weight"
    halves = pp2.state[name].chunk(3)
    unstrided = torch.cat([halves[0], halves[2], halves[1]])
    assert (unstrided - pp1.state[name]).abs().max().item() > 0.03


@pytest.mark.parametrize(("source", "tp", "pp"), [("tp2_pp2", 2, 2), ("tp2_pp1", 2, 1)])
def test_write_matches_the_files_deepspeed_wrote(
    sources: TrainedCheckpoints, tmp_path: Path, source: str, tp: int, pp: int
) -> None:
    original = getattr(sources, source) / str(ITERATIONS)
    FORM.write(FORM.read(original), tmp_path / "out", tensor_parallel=tp, pipeline_parallel=pp)
    written = tmp_path / "out" / str(ITERATIONS)
    model_files = sorted(p.name for p in original.glob("*model_states.pt"))
    assert sorted(p.name for p in written.glob("*model_states.pt")) == model_files
    for name in model_files:
        ours, theirs = _load(written / name), _load(original / name)
        if name.startswith("mp_rank_"):
            assert list(ours) == list(theirs), name  # DeepSpeed's keys, in its order
            for key in ("mp_world_size", "checkpoint_parallel_dimensions", "iteration"):
                assert ours[key] == theirs[key], (name, key)
            ours, theirs = ours["module"], theirs["module"]
            if pp > 1:
                assert ours is None and theirs is None
                continue
        assert list(ours) == list(theirs), name
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]), (name, key)
    meta = json.loads((written / META_FILE).read_text())
    assert meta["weights_only"] is True
    assert meta["config"]["training"] == {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
    }
    assert (tmp_path / "out" / "latest").read_text() == str(ITERATIONS)
    assert (tmp_path / "out" / "latest_checkpointed_iteration.txt").read_text() == str(ITERATIONS)
    assert (written / COMPLETE_MARKER).is_file()


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (4, 1), (4, 2), (1, 2)])
def test_write_then_read_is_bitwise(
    pp2: CanonicalCheckpoint, tmp_path: Path, tp: int, pp: int
) -> None:
    FORM.write(pp2, tmp_path / "out", tensor_parallel=tp, pipeline_parallel=pp)
    back = FORM.read(tmp_path / "out")
    assert back.config == pp2.config
    assert back.iteration == pp2.iteration
    assert back.tokenizer == pp2.tokenizer
    assert back.extra["tensor_model_parallel_size"] == tp
    assert list(back.state) == list(pp2.state)
    for name, tensor in pp2.state.items():
        assert torch.equal(back.state[name], tensor), name


def test_write_refuses_impossible_layouts_and_non_empty_output(
    pp2: CanonicalCheckpoint, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match="tensor-parallel size 3 must divide"):
        FORM.write(pp2, tmp_path / "a", tensor_parallel=3)
    with pytest.raises(CheckpointError, match="pipeline-parallel size 3 exceeds the 2"):
        FORM.write(pp2, tmp_path / "b", pipeline_parallel=3)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is not empty"):
        FORM.write(pp2, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_wrong_model_config(sources: TrainedCheckpoints, pp2: CanonicalCheckpoint) -> None:
    import dataclasses

    wrong = dataclasses.replace(pp2.config, hidden_size=64)
    with pytest.raises(CheckpointError) as err:
        FORM.read(sources.tp2_pp1, wrong)
    assert f"{META_FILE}: hidden_size is 32, the given model config says 64" in _problems(err)


def test_missing_and_extra_shards(sources: TrainedCheckpoints, tmp_path: Path) -> None:
    root = _copy(sources.tp2_pp1, tmp_path)
    tag = root / str(ITERATIONS)
    shutil.copy(tag / module_file_name(1), tag / module_file_name(2))
    (tag / module_file_name(1)).unlink()
    with pytest.raises(CheckpointError) as err:
        FORM.read(root)
    text = _problems(err)
    assert f"{tag / module_file_name(1)}: missing" in text
    assert f"{tag / module_file_name(2)}: unexpected shard (TP 2 has mp_rank_00..01)" in text


def test_missing_pipeline_layer_file(sources: TrainedCheckpoints, tmp_path: Path) -> None:
    root = _copy(sources.tp2_pp2, tmp_path)
    tag = root / str(ITERATIONS)
    (tag / layer_file_name(3, 0)).unlink()
    with pytest.raises(CheckpointError, match=rf"{layer_file_name(3, 0)}: missing"):
        FORM.read(root)


def test_tp_files_that_disagree_on_a_replicated_tensor(
    sources: TrainedCheckpoints, tmp_path: Path
) -> None:
    root = _copy(sources.tp2_pp1, tmp_path)
    path = root / str(ITERATIONS) / module_file_name(1)
    states = _load(path)
    states["module"]["transformer.layers.1.post_attention_layernorm.weight"][3] += 1e-3
    torch.save(states, path)
    with pytest.raises(CheckpointError) as err:
        FORM.read(root)
    assert _problems(err) == (
        f"{path}: transformer.layers.1.post_attention_layernorm.weight differs from "
        f"{module_file_name(0)} (replicated: every TP rank holds the same values)"
    )


def test_shard_of_the_wrong_shape_names_the_file(
    sources: TrainedCheckpoints, tmp_path: Path
) -> None:
    root = _copy(sources.tp2_pp2, tmp_path)
    path = root / str(ITERATIONS) / layer_file_name(1, 1)
    state = _load(path)
    state["mlp.dense_h_to_4h.weight"] = state["mlp.dense_h_to_4h.weight"][:-1].clone()
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        FORM.read(root)
    assert _problems(err) == (
        f"{path}: mlp.dense_h_to_4h.weight has shape (63, 32), the model config expects "
        "(64, 32) at TP 2"
    )


@pytest.mark.parametrize("name", [module_file_name(0), layer_file_name(0, 1)])
def test_truncated_file(sources: TrainedCheckpoints, tmp_path: Path, name: str) -> None:
    source = sources.tp2_pp1 if name.startswith("mp_rank") else sources.tp2_pp2
    root = _copy(source, tmp_path)
    path = root / str(ITERATIONS) / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        FORM.read(root)
    assert _problems(err).startswith(f"{path}: cannot be read (truncated or not a torch file)")


# ---- ZeRO stage 3: the weights come from the layout-free fp32 masters -------------------------
def _zero3_final_weights(zero3: Zero3Checkpoint, config: Any) -> dict[str, torch.Tensor]:
    shards = [load_file(path) for path in zero3.weights]
    return merge_shards(shards, config, "the ZeRO 3 run's final module weights")


def test_zero3_reads_the_weights_the_run_ended_with(zero3: Zero3Checkpoint) -> None:
    tag = zero3.save / str(ITERATIONS)
    assert not list(tag.glob("mp_rank_*")) and list(tag.glob("zero_pp_rank_*_model_states.pt"))
    checkpoint = FORM.read(zero3.save)
    assert "fp32 master weights of layout_free/, cast to bf16" in checkpoint.extra["weights"]
    assert checkpoint.extra["tensor_model_parallel_size"] == 2
    assert list(checkpoint.state) == canonical_names(checkpoint.config)
    final = _zero3_final_weights(zero3, checkpoint.config)
    for name, tensor in checkpoint.state.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, final[name]), name
    # the run trained: its weights are not the initial ones (seeded per canonical name)
    initial = GLMModel(checkpoint.config).state_dict()
    name = "transformer.layers.1.attention.query_key_value.weight"
    assert not torch.equal(initial[name].to(torch.bfloat16), final[name])


TOOL = "tools/convert_checkpoint.py"


def _load_tool() -> Any:
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_zero3_to_consolidated_through_the_tool(zero3: Zero3Checkpoint, tmp_path: Path) -> None:
    out = tmp_path / "consolidated"
    code = _load_tool().main(
        ["--input", str(zero3.save), "--output", str(out), "--to", "consolidated"]
    )
    assert code == 0
    written = consolidated.FORM.read(out)
    final = _zero3_final_weights(zero3, written.config)
    assert sorted(written.state) == sorted(final)
    for name, tensor in written.state.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, final[name]), name
    model = GLMModel.from_pretrained(out)
    assert torch.equal(model.word_embeddings.weight, final["word_embeddings.weight"])


def test_zero3_without_layout_free_state(zero3: Zero3Checkpoint, tmp_path: Path) -> None:
    root = _copy(zero3.save, tmp_path)
    tag = root / str(ITERATIONS)
    missing = tag / LAYOUT_FREE_DIR / rank_file_name(1, 0, 0)
    missing.unlink()
    with pytest.raises(CheckpointError) as err:
        FORM.read(root)
    assert _problems(err) == f"{missing}: missing"
    shutil.rmtree(tag / LAYOUT_FREE_DIR)
    with pytest.raises(CheckpointError) as err:
        FORM.read(root)
    text = _problems(err)
    assert text.startswith(f"{tag}: a ZeRO stage 3 checkpoint")
    assert "without layout_free/state.json" in text
