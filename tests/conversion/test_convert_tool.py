"""tools/convert_checkpoint.py: conversions between our forms, --dtype, the tokenizer flags, and
bad input (exit 2, every problem naming its file, nothing written to --output).

Most cases call the tool's ``main`` in this process (the command line is the same; a process
start costs seconds on the test machine); two run it as a user does.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

from megatron_glm.conversion import consolidated, deepspeed_form
from megatron_glm.conversion.canonical import CanonicalCheckpoint
from tests.conversion import ITERATIONS, TrainedCheckpoints
from tests.tools.cli import REPO, run_tool

TOOL = "tools/convert_checkpoint.py"


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def _same_tensors(a: CanonicalCheckpoint, b: CanonicalCheckpoint) -> bool:
    return list(a.state) == list(b.state) and all(
        a.state[n].dtype == b.state[n].dtype and torch.equal(a.state[n], b.state[n])
        for n in a.state
    )


def _convert(*args: str | Path) -> int:
    return tool.main([str(a) for a in args])


def test_conversions_between_our_forms_are_bitwise(
    sources: TrainedCheckpoints, trained: CanonicalCheckpoint, tmp_path: Path
) -> None:
    # ours(TP2, PP2) -> consolidated -> ours(TP1) -> consolidated, and ours(TP4, PP2)
    assert (
        _convert("--input", sources.tp2_pp2, "--output", tmp_path / "c1", "--to", "consolidated")
        == 0
    )
    assert (
        _convert("--input", tmp_path / "c1", "--output", tmp_path / "tp1", "--to", "deepspeed") == 0
    )
    assert (
        _convert("--input", tmp_path / "tp1", "--output", tmp_path / "c2", "--to", "consolidated")
        == 0
    )
    for path in ("c1", "c2"):
        assert _same_tensors(trained, consolidated.FORM.read(tmp_path / path)), path
    tp1 = deepspeed_form.FORM.read(tmp_path / "tp1")
    assert tp1.extra == {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}
    assert _same_tensors(trained, tp1)
    code = _convert(
        "--input", tmp_path / "c2", "--output", tmp_path / "tp4pp2", "--to", "deepspeed",
        "--target-tensor-parallel-size", "4", "--target-pipeline-parallel-size", "2",
    )  # fmt: skip
    assert code == 0
    tp4 = deepspeed_form.FORM.read(tmp_path / "tp4pp2")
    assert tp4.extra == {"tensor_model_parallel_size": 4, "pipeline_model_parallel_size": 2}
    assert _same_tensors(trained, tp4)
    assert not list(tmp_path.glob(".*partial"))


def test_dtype_bf16(
    trained: CanonicalCheckpoint, sources: TrainedCheckpoints, tmp_path: Path
) -> None:
    for form in ("consolidated", "deepspeed"):
        out = tmp_path / form
        assert (
            _convert("--input", sources.tp2_pp1, "--output", out, "--to", form, "--dtype", "bf16")
            == 0
        )
        back = (consolidated if form == "consolidated" else deepspeed_form).FORM.read(out)
        assert {t.dtype for t in back.state.values()} == {torch.bfloat16}
        # the TP 2 x PP 1 run's own weights, cast
        reference = deepspeed_form.FORM.read(sources.tp2_pp1)
        for name, tensor in reference.state.items():
            assert torch.equal(back.state[name], tensor.to(torch.bfloat16)), (form, name)


def test_tokenizer_flags_record_and_check_the_tokenizer(
    sources: TrainedCheckpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = sources.corpus.tokenizer_model
    flags = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(model)]
    out = tmp_path / "with_tokenizer"
    assert (
        _convert("--input", sources.tp2_pp1, "--output", out, "--to", "consolidated", *flags) == 0
    )
    recorded = json.loads((out / consolidated.TOKENIZER_CONFIG_FILE).read_text())
    assert recorded["tokenizer_model"] == model.name
    assert (out / model.name).read_bytes() == model.read_bytes()
    # the command tokens appended after the 512 pieces do not fit a 512-token model
    flags = ["--tokenizer-type", "ChineseSPTokenizer", "--tokenizer-model", str(model)]
    code = _convert(
        "--input", sources.tp2_pp1, "--output", tmp_path / "x", "--to", "consolidated", *flags
    )
    assert code == 2
    assert "more than the model's vocabulary of 512" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _drop_shard(tag: Path) -> str:
    (tag / deepspeed_form.module_file_name(1)).unlink()
    return f"{tag / deepspeed_form.module_file_name(1)}: missing"


def _extra_shard(tag: Path) -> str:
    shutil.copy(tag / deepspeed_form.module_file_name(1), tag / deepspeed_form.module_file_name(2))
    return f"{tag / deepspeed_form.module_file_name(2)}: unexpected shard"


def _disagree(tag: Path) -> str:
    path = tag / deepspeed_form.module_file_name(1)
    states = torch.load(path, map_location="cpu", weights_only=True)
    states["module"]["transformer.position_embeddings.weight"][7, 1] *= 2
    torch.save(states, path)
    return f"{path}: transformer.position_embeddings.weight differs from mp_rank_00"


def _truncate(tag: Path) -> str:
    path = tag / deepspeed_form.module_file_name(0)
    path.write_bytes(path.read_bytes()[:1000])
    return f"{path}: cannot be read (truncated or not a torch file)"


DAMAGE: dict[str, Callable[[Path], str]] = {
    "missing shard": _drop_shard,
    "extra shard": _extra_shard,
    "disagreeing TP files": _disagree,
    "truncated file": _truncate,
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_input_exits_2_naming_the_file(
    sources: TrainedCheckpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    root = tmp_path / "damaged"
    shutil.copytree(sources.tp2_pp1, root)
    expected = DAMAGE[case](root / str(ITERATIONS))
    out = tmp_path / "out"
    assert _convert("--input", root, "--output", out, "--to", "consolidated") == 2
    err = capsys.readouterr().err
    assert expected in err
    assert f"nothing was written to {out}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]  # no output, no temp dir


WRONG_CONFIGS = {
    "a size that differs": (
        ["--hidden-size", "64"],
        "hidden_size is 32, --hidden-size says 64",
    ),
    "heads that do not divide the hidden size": (
        ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "5",
         "--vocab-size", "512", "--max-position-embeddings", "64"],
        "hidden_size (32) is not divisible by num_attention_heads (5)",
    ),
    "a config file whose hidden size differs": (
        ["--config", "CONFIG"],
        "megatron_glm_meta.json: hidden_size is 32, the given model config says 64",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(WRONG_CONFIGS))
def test_wrong_model_config_exits_2(
    sources: TrainedCheckpoints,
    trained: CanonicalCheckpoint,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    flags, message = WRONG_CONFIGS[case]
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({**trained.config.to_dict(), "hidden_size": 64}))
    flags = [str(config_file) if f == "CONFIG" else f for f in flags]
    out = tmp_path / "out"
    assert _convert("--input", sources.tp2_pp1, "--output", out, "--to", "deepspeed", *flags) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_layout_the_model_cannot_take_leaves_nothing(
    sources: TrainedCheckpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = _convert(
        "--input", sources.tp2_pp1, "--output", out, "--to", "deepspeed",
        "--target-tensor-parallel-size", "3",
    )  # fmt: skip
    assert code == 2
    assert "tensor-parallel size 3 must divide" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_non_empty_output_is_refused_and_kept(
    sources: TrainedCheckpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _convert("--input", sources.tp2_pp1, "--output", out, "--to", "consolidated") == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # an empty directory is fine: it becomes the output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _convert("--input", sources.tp2_pp1, "--output", empty, "--to", "consolidated") == 0
    assert (empty / consolidated.WEIGHTS_FILE).is_file()


def test_command_line(sources: TrainedCheckpoints, tmp_path: Path) -> None:
    assert "weights_only=True" in " ".join(tool.build_parser().format_help().split())
    out = tmp_path / "out"
    done = run_tool(
        TOOL, "--input", str(tmp_path / "nowhere"), "--output", str(out), "--to", "consolidated"
    )
    assert done.returncode == 2, done.stderr
    assert f"{tmp_path / 'nowhere'} does not exist" in done.stderr
    assert not out.exists()
    done = run_tool(
        TOOL, "--input", str(sources.tp2_pp1), "--output", str(out), "--to", "consolidated"
    )
    assert done.returncode == 0, done.stderr
    assert f"reading {sources.tp2_pp1} (deepspeed form)" in done.stderr
    assert f"wrote {out} (consolidated form, TP 1 x PP 1)" in done.stderr


def test_flags_fill_in_what_an_official_checkpoint_does_not_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from megatron_glm.config import GLMConfig
    from megatron_glm.conversion import official
    from megatron_glm.model import GLMModel

    # head dim 32, vocabulary 1000: neither is in the official files (the reader assumes 64 and
    # the padded 1024)
    config = GLMConfig(
        num_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        vocab_size=1000,
        max_sequence_length=32,
    )
    state = dict(GLMModel(config).state_dict())
    source = tmp_path / "official"
    official.FORM.write(CanonicalCheckpoint(config, state), source, tensor_parallel=2)
    for path in source.rglob("mp_rank_*_model_states.pt"):  # as the official trainer writes them
        states = torch.load(path, map_location="cpu", weights_only=True)
        torch.save({"module": states["module"]}, path)
    flags = ["--num-attention-heads", "4", "--vocab-size", "1000"]
    assert (
        _convert("--input", source, "--output", tmp_path / "c", "--to", "consolidated", *flags) == 0
    )
    back = consolidated.FORM.read(tmp_path / "c")
    assert back.config == config
    assert all(torch.equal(back.state[n], t) for n, t in state.items())
    # what the files do say is checked
    code = _convert(
        "--input", source, "--output", tmp_path / "d", "--to", "consolidated", "--num-layers", "3"
    )
    assert code == 2
    assert f"{source}: num_layers is 2, --num-layers says 3" in capsys.readouterr().err
