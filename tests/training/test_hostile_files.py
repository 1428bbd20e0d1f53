"""No code from any file we read (docs/checkpoints.md#integrity).

- A payload (a pickle that creates a marker file when unpickled) planted in every file of real
  checkpoints of ZeRO stages 0-3 and of a two-stage pipeline, as a torch zip file, a legacy torch
  file and a bare pickle, with the manifest rewritten to match (a hostile checkpoint, not a damaged
  one): the resume refuses it naming the file, the reader of that file (DeepSpeed's, through our
  weights-only checkpoint engine; the RNG, safetensors, JSON and manifest readers) refuses it
  naming the file, and the marker never appears. Control: the same payload runs under a plain
  unpickle. End to end, ``pretrain_glm.py`` resuming such checkpoints exits 2 naming a file.
- With no verification before it, a real DeepSpeed engine (ZeRO 0-3) loading a checkpoint through
  ``checkpointing.load_checkpoint`` refuses a payload in each of its torch files, naming it.
- Sample-index caches with bad values are rebuilt, never used.
- A static check: no unsafe load (``torch.load`` without ``weights_only=True``, ``pickle``,
  ``numpy.load(allow_pickle=True)``, ``yaml.load``, ``marshal``, ...) anywhere in the package, the
  tools and the top-level scripts.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from megatron_glm.conversion.canonical import CheckpointError
from megatron_glm.conversion.files import read_json_object
from megatron_glm.integrity import record_files
from megatron_glm.training import reshard
from megatron_glm.training.checkpoint_engine import WeightsOnlyCheckpointEngine
from megatron_glm.training.checkpointing import (
    COMPLETE_MARKER,
    LATEST_FILE,
    LATEST_ITERATION_FILE,
    LoadDirError,
    checkpoint_to_resume,
)
from megatron_glm.training.manifest import Manifest
from tests.tools.cli import REPO
from tests.training.helpers import Corpus, launch, pretrain_args, write_ds_config

# name -> (world size, layout flags, DeepSpeed settings); one iteration, one checkpoint each
LAYOUTS: dict[str, tuple[int, list[str], dict[str, Any]]] = {
    "zero0": (1, [], {"micro": 4}),
    "zero1": (1, [], {"micro": 4, "zero_stage": 1}),
    "zero2": (1, [], {"micro": 4, "zero_stage": 2}),
    "zero3": (1, [], {"micro": 4, "zero_stage": 3}),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"], {"micro": 2, "gas": 2}),
}
POINTERS = (LATEST_FILE, LATEST_ITERATION_FILE)


class Payload:
    """Unpickling this creates ``marker`` (``open(marker, "w")``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


class ShellPayload:
    """Unpickling this runs ``touch marker`` through ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _payloads(marker: Path) -> dict[str, bytes]:
    """The same payload as a torch zip file, a legacy torch file and a bare pickle."""
    obj = {"module": {"w": torch.zeros(2), "b": Payload(marker)}, "x": ShellPayload(marker)}
    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save(obj, zipped)
    torch.save(obj, legacy, _use_new_zipfile_serialization=False)
    return {"zip": zipped.getvalue(), "legacy": legacy.getvalue(), "pickle": pickle.dumps(obj)}


def test_the_payload_is_live(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    pickle.loads(_payloads(marker)["pickle"])  # the control: it must run
    assert marker.exists()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, glm_corpus: Corpus) -> dict[str, Path]:
    """``--save`` directories holding one checkpoint (iteration 1) of each layout."""
    tmp = tmp_path_factory.mktemp("hostile")
    out = {}
    for name, (world_size, flags, ds) in LAYOUTS.items():
        config = write_ds_config(tmp / f"{name}.json", train_batch=4, **ds)
        ckpt = tmp / name
        args = pretrain_args(
            glm_corpus, config, tmp / f"{name}.jsonl", iters=1, bert_prob=0.5, extra=flags
        )
        result = launch(world_size, [*args, "--save", str(ckpt)], log_dir=tmp / "logs")
        assert result.ok, result.describe()
        out[name] = ckpt
    return out


def _reader_refuses(path: Path, tag_dir: Path) -> None:
    """The reader a resume uses for ``path`` refuses it with a ``CheckpointError`` naming it."""
    with pytest.raises(CheckpointError) as err:
        if path.name == COMPLETE_MARKER:
            Manifest.read(tag_dir)
        elif path.suffix == ".pt":  # DeepSpeed's files and the RNG streams
            WeightsOnlyCheckpointEngine(None).load(str(path))
        elif path.suffix == ".safetensors":
            reshard._SavedTensors(path.parent)
        else:
            read_json_object(path)
    assert str(path) in str(err.value)


def _plant(tag_dir: Path, path: Path, payload: bytes) -> None:
    """Replace ``path`` with ``payload`` and rewrite the manifest of ``tag_dir`` to match it."""
    path.write_bytes(payload)
    if path.is_relative_to(tag_dir) and path.name != COMPLETE_MARKER:
        manifest = Manifest.read(tag_dir)
        name = path.relative_to(tag_dir).as_posix()
        manifest.files.update(record_files(tag_dir, [name]))
        (tag_dir / COMPLETE_MARKER).write_text(manifest.to_json())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the bare pickle's: refused anyway
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_payload_in_any_file_never_runs(
    layout: str, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "ckpt"
    shutil.copytree(checkpoints[layout], root)
    marker = tmp_path / "marker"
    payloads = _payloads(marker)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    pristine = checkpoint_to_resume(root)  # the checkpoint as saved resumes
    assert pristine is not None
    tag_dir = pristine.path
    kinds = {p.name if p.name in (COMPLETE_MARKER, *POINTERS) else p.suffix for p in files}
    assert {".pt", ".safetensors", ".json", COMPLETE_MARKER, *POINTERS} <= kinds, kinds
    manifest_text = (tag_dir / COMPLETE_MARKER).read_text()
    for path in files:
        original = path.read_bytes()
        for variant, payload in payloads.items():
            _plant(tag_dir, path, payload)
            if not path.is_relative_to(tag_dir):
                # a pointer (ignored: the directory is found without it), DeepSpeed's
                # zero_to_fp32.py, an older checkpoint: not read by this resume
                assert checkpoint_to_resume(root) == pristine, (path, variant)
            else:
                with pytest.raises(LoadDirError) as err:
                    checkpoint_to_resume(root)
                assert str(path) in str(err.value), (path, variant, str(err.value))
                _reader_refuses(path, tag_dir)
            assert not marker.exists(), (path, variant)
            path.write_bytes(original)
            (tag_dir / COMPLETE_MARKER).write_text(manifest_text)


@pytest.mark.parametrize("layout", ["zero1", "pp2"])
def test_resume_of_a_hostile_checkpoint_exits_2(
    layout: str, checkpoints: dict[str, Path], glm_corpus: Corpus, tmp_path: Path
) -> None:
    """Through ``pretrain_glm.py``: a payload in every torch file, the manifest rewritten."""
    root = tmp_path / "ckpt"
    shutil.copytree(checkpoints[layout], root)
    marker = tmp_path / "marker"
    payload = _payloads(marker)["zip"]
    tag_dir = root / "1"
    planted = sorted(tag_dir.rglob("*.pt"))
    for path in planted:
        _plant(tag_dir, path, payload)
    world_size, flags, ds = LAYOUTS[layout]
    config = write_ds_config(tmp_path / "ds.json", train_batch=4, **ds)
    args = pretrain_args(
        glm_corpus, config, tmp_path / "log.jsonl", iters=2, bert_prob=0.5, extra=flags
    )
    result = launch(world_size, [*args, "--load", str(root)], log_dir=tmp_path)
    assert set(result.returncodes) == {2}, result.describe()
    assert any(str(path) in result.outputs[0] for path in planted), result.outputs[0]
    assert "Traceback" not in "".join(result.outputs)
    assert not marker.exists()


def test_zero3_without_optimizer_state_loads_from_the_layout_free_state(
    checkpoints: dict[str, Path], glm_corpus: Corpus, tmp_path: Path
) -> None:
    """DeepSpeed would rebuild ZeRO 3 weights without the optimizer state with its unpickling
    ``zero_to_fp32`` reader; the resume reads the layout-free safetensors instead."""
    root = tmp_path / "ckpt"
    shutil.copytree(checkpoints["zero3"], root)
    world_size, flags, ds = LAYOUTS["zero3"]
    config = write_ds_config(tmp_path / "ds.json", train_batch=4, **ds)
    args = pretrain_args(glm_corpus, config, tmp_path / "log.jsonl", iters=2, bert_prob=0.5)
    result = launch(world_size, [*args, "--load", str(root), "--no-load-optim"], log_dir=tmp_path)
    assert result.ok, result.describe()
    assert "weights only (fresh optimizer)" in result.outputs[0]


def _deepspeed_reads_weights_only(rank: int, world_size: int, tmp: str) -> dict[str, list[str]]:
    """For ZeRO stages 0-3: a real DeepSpeed engine saves a checkpoint; each of its torch files in
    turn becomes a payload and ``load_checkpoint`` (no verification before it) loads the
    checkpoint through DeepSpeed. Returns, per stage, the files whose payload was refused with an
    error naming them; the untouched checkpoint must load."""
    import deepspeed

    from megatron_glm.training.checkpointing import META_FILE, CheckpointRef, load_checkpoint

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    payload = _payloads(Path(tmp) / "marker")["zip"]
    refused: dict[str, list[str]] = {}
    for stage in (0, 1, 2, 3):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        config = {
            "train_batch_size": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": {"stage": stage},
        }
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config
        )
        engine.backward(engine(torch.ones(1, 4)).sum())
        engine.step()
        tag_dir = Path(tmp) / f"zero{stage}" / "1"
        state = {"iteration": 1, "consumed_samples": 1}
        engine.save_checkpoint(str(tag_dir.parent), tag="1", client_state=state, save_latest=False)
        (tag_dir / META_FILE).write_text(json.dumps(state))
        ref = CheckpointRef("1", 1, tag_dir)
        refused[f"zero{stage}"] = []
        for path in sorted(tag_dir.glob("*.pt")):
            original = path.read_bytes()
            path.write_bytes(payload)
            try:
                load_checkpoint(engine, ref)
            except CheckpointError as err:
                if str(path) in str(err):
                    refused[f"zero{stage}"].append(path.name)
            path.write_bytes(original)
        assert load_checkpoint(engine, ref).iteration == 1
    return refused


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_deepspeed_loads_go_through_the_weights_only_engine(tmp_path: Path) -> None:
    """What DeepSpeed itself reads during ``load_checkpoint`` (module states, optimizer and ZeRO
    partitions) is refused when it holds a payload, naming the file, with no check before it."""
    from tests.distributed.harness import run_distributed

    (refused,) = run_distributed(_deepspeed_reads_weights_only, 1, str(tmp_path), timeout=300)
    assert refused == {
        "zero0": ["mp_rank_00_model_states.pt"],
        "zero1": ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
        "zero2": ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
        "zero3": [
            "zero_pp_rank_0_mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        ],
    }
    assert not (tmp_path / "marker").exists()


def test_sample_index_with_bad_values_is_rebuilt(tmp_path: Path) -> None:
    from megatron_glm.data.glm_dataset import GLMDataset
    from tests.data.test_glm_dataset import CLS, EOS, write_toy_dataset

    prefix = str(tmp_path / "docs")
    write_toy_dataset(prefix, 40, seed=4)
    cache = str(tmp_path / "cache")
    first = GLMDataset(prefix, (0, 40), 48, seed=9, cls_id=CLS, eos_id=EOS, cache_dir=cache)
    samples = [first[i]["text"].copy() for i in range(6)]
    paths = first.cache_paths(0)
    for part, bad in (
        ("samples", lambda a: a * 1000),  # out of range: would crash mid-run
        ("shuffle", lambda a: a[::-1]),  # still a permutation: would change the samples silently
        ("docs", lambda a: a[:-1]),  # another shape
    ):
        saved = np.load(paths[part])
        np.save(paths[part], bad(saved))
        again = GLMDataset(prefix, (0, 40), 48, seed=9, cls_id=CLS, eos_id=EOS, cache_dir=cache)
        assert again.built_epochs == [0], part
        assert all(np.array_equal(again[i]["text"], samples[i]) for i in range(6)), part
        assert np.array_equal(np.load(paths[part]), saved), "the cache is rewritten"
    os.unlink(paths["record"])  # files without their record are not trusted either
    again = GLMDataset(prefix, (0, 40), 48, seed=9, cls_id=CLS, eos_id=EOS, cache_dir=cache)
    assert again.built_epochs == [0] and os.path.isfile(paths["record"])
    eos = next(Path(cache).glob("*_eos.npy"))
    np.save(eos, ~np.load(eos))
    again = GLMDataset(prefix, (0, 40), 48, seed=9, cls_id=CLS, eos_id=EOS, cache_dir=cache)
    assert all(np.array_equal(again[i]["text"], samples[i]) for i in range(6))


# ---- static: no unsafe load in what ships -----------------------------------------------------
_UNSAFE_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("_pickle", "load"),
    ("_pickle", "loads"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("shelve", "open"),
    ("dill", "load"),
    ("dill", "loads"),
    ("joblib", "load"),
    ("yaml", "load"),
    ("yaml", "unsafe_load"),
    ("yaml", "full_load"),
    ("pandas", "read_pickle"),
    ("pd", "read_pickle"),
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def unsafe_loads(source: str, filename: str) -> list[str]:
    """Every call in ``source`` that may unpickle code: ``torch.load`` without a literal
    ``weights_only=True``, ``numpy.load`` with ``allow_pickle`` other than a literal False,
    ``pickle``/``marshal``/``dill``/``joblib``/``shelve``/``yaml.load`` loads, and importing
    those loaders by name."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if (node.module.split(".")[-1], alias.name) in _UNSAFE_CALLS or (
                    node.module == "torch" and alias.name == "load"
                ):
                    found.append(
                        f"{filename}:{node.lineno}: from {node.module} import {alias.name}"
                    )
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        parts = tuple(name.split("."))
        where = f"{filename}:{node.lineno}: {name}"
        if parts[-2:] in _UNSAFE_CALLS:
            found.append(where)
        elif name in ("torch.load", "torch.serialization.load"):
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"{where} without weights_only=True")
        elif name in ("np.load", "numpy.load") and "allow_pickle" in keywords:
            value = keywords["allow_pickle"]
            if not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{where} with allow_pickle")
        elif any(
            isinstance(v, ast.Constant) and v.value is False and k == "weights_only"
            for k, v in keywords.items()
        ):
            found.append(f"{where} with weights_only=False")
    return found


def test_the_static_check_finds_unsafe_loads() -> None:
    bad = """
import pickle, yaml, numpy as np, torch
from pickle import loads
torch.load(f)
torch.load(f, weights_only=False)
torch.load(f, weights_only=flag)
np.load(f, allow_pickle=True)
pickle.load(f)
yaml.load(f)
deepspeed_engine.load(f, weights_only=False)
"""
    good = "import torch, numpy as np\ntorch.load(f, weights_only=True)\nnp.load(f)\n"
    assert len(unsafe_loads(bad, "bad.py")) == 8
    assert unsafe_loads(good, "good.py") == []


def test_no_unsafe_load_ships() -> None:
    trees = [REPO / "megatron_glm", REPO / "tools", REPO / "benchmarks", REPO / "examples"]
    files = [p for tree in trees if tree.is_dir() for p in sorted(tree.rglob("*.py"))]
    files += sorted(REPO.glob("*.py"))
    assert any(p.name == "pretrain_glm.py" for p in files) and len(files) > 50
    found = [
        hit for path in files for hit in unsafe_loads(path.read_text(), str(path.relative_to(REPO)))
    ]
    assert not found, "unsafe loads:\n" + "\n".join(found)
