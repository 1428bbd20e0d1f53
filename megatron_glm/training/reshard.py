"""Resuming a checkpoint on another cluster shape (docs/checkpoints.md#resuming-on-another-layout).

DeepSpeed's own checkpoint files are per model-parallel rank and per ZeRO partition, so they
reload only into the layout that wrote them. Every save therefore also writes the training state
in a layout-free form, next to DeepSpeed's files::

    <tag>/layout_free/state.json                  layout, optimizer step, LR schedule, counters
    <tag>/layout_free/tpTT_ppPP_dpDD.safetensors  fp32 master weights and Adam moments

Each tensor is one TP rank's partition of a parameter under its canonical name
(docs/model.md#canonical-parameter-names), gathered over data parallelism (ZeRO partitions
joined), keyed ``"<what>/tp<r>/<canonical name>"`` with ``<what>`` = ``fp32`` or an optimizer
state key (``exp_avg``, ``exp_avg_sq``). A name replicated over TP is written once (TP rank 0's
copy, key ``tp0``), the last pipeline stage's copy of the tied word table not at all (it equals
the first stage's). The data-parallel ranks of a (TP, PP) coordinate take turns writing
parameters, so the files are spread over ranks. The ``deepspeed`` checkpoint form reads the
weights of a ZeRO 3 checkpoint, whose DeepSpeed module files hold none, from the fp32 masters here
(``read_master_weights``).

A resume whose layout (TP, PP, DP, ZeRO stage, precision) differs from the checkpoint's builds its
engine as usual, then sets every parameter: the canonical tensor is rebuilt from the saved TP
partitions (``gather_tensor_shards``) and cut for this rank (``shard_tensor``), written to the
module's weights, to the fp32 masters and to the optimizer's moments through DeepSpeed's
``safe_set_full_*`` API (ZeRO 1/2/3 and its bf16 optimizer) or, at ZeRO 0, straight into the
torch optimizer's state and the fp32 copies of DeepSpeed's fp16 wrappers. The Adam step, the LR schedule, DeepSpeed's step/sample/skip counters and the fp16 loss
scaler follow; the data position is the consumed-sample count, so the global batch must not change.

Why not DeepSpeed's universal checkpoint (``ds_to_universal`` + ``load_universal``): it names
parameters by module path, and a ``PipelineModule``'s paths (``3.attention...``,
``tied_modules...``) are not ``GLMModel``'s, so PP 2 -> PP 1 would need a renaming pass; it is an
offline conversion reading every rank's pickled optimizer files; and its loader is per ZeRO stage.
DeepSpeed's ``safe_get_full_*`` / ``safe_set_full_*`` accessors, the part of that machinery that
hides ZeRO's partitioning, are what this module uses.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.config import GLMConfig
from megatron_glm.conversion.canonical import CheckpointError, Partition, partition_of
from megatron_glm.conversion.files import read_json_object
from megatron_glm.parallel.utils import gather_tensor_shards, shard_tensor
from megatron_glm.training.pipeline import module_canonical_name

logger = logging.getLogger(__name__)

LAYOUT_FREE_DIR = "layout_free"
STATE_FILE = "state.json"
FORMAT_VERSION = 1
MASTER_KEY = "fp32"


@dataclass(frozen=True)
class Layout:
    tensor: int
    pipeline: int
    data: int
    zero_stage: int
    precision: str

    def describe(self) -> str:
        return (
            f"TP{self.tensor} x PP{self.pipeline} x DP{self.data}, ZeRO {self.zero_stage}, "
            f"{self.precision}"
        )


def _precision(engine: Any) -> str:
    if engine.bfloat16_enabled():
        return "bf16"
    return "fp16" if engine.fp16_enabled() else "fp32"


def engine_layout(engine: Any, tensor: int, pipeline: int) -> Layout | None:
    """This run's layout; ``None`` for an object that is not a DeepSpeed engine (tests' stand-ins)."""
    if not hasattr(engine, "zero_optimization_stage") or not hasattr(engine, "dp_world_size"):
        return None
    return Layout(
        tensor,
        pipeline,
        int(engine.dp_world_size),
        engine.zero_optimization_stage(),
        _precision(engine),
    )


def read_state(tag_dir: Path) -> dict[str, Any] | None:
    """The layout-free state's JSON, ``None`` when the checkpoint has none; ``CheckpointError``
    naming the file when it is not a JSON object."""
    path = Path(tag_dir) / LAYOUT_FREE_DIR / STATE_FILE
    if not path.is_file():
        return None
    return read_json_object(path)


def saved_layout(state: dict[str, Any]) -> Layout:
    return Layout(**state["layout"])


# ---- parameters under canonical names --------------------------------------------------------
def _is_pipeline(module: Any) -> bool:
    from deepspeed.pipe import PipelineModule

    return isinstance(module, PipelineModule)


def _named_parameters(engine: Any, config: GLMConfig) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``(canonical name, parameter)`` of this rank's module: a ``GLMModel``'s names are canonical,
    a ``PipelineModule``'s are mapped by pipeline.py's rule."""
    module = engine.module
    if not _is_pipeline(module):
        yield from module.named_parameters()
        return
    for name, param in module.named_parameters():
        yield module_canonical_name(name, config.num_layers), param


def _full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO 3 keeps the shape aside


def _key(what: str, tp_rank: int, name: str) -> str:
    return f"{what}/tp{tp_rank}/{name}"


def rank_file_name(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    """The layout-free tensors written by the rank at these coordinates."""
    return f"tp{tp_rank:02d}_pp{pp_rank:02d}_dp{dp_rank:02d}.safetensors"


# ---- the optimizer behind the engine ---------------------------------------------------------
class _Optimizer:
    """Uniform access to fp32 masters and optimizer state, whatever DeepSpeed wrapped.

    ``mode``: ``"local"`` (ZeRO 0: every data-parallel rank holds whole masters; the plain torch
    optimizer of fp32, whose masters are the module parameters, or DeepSpeed's
    ``FP16_Optimizer``/``FP16_UnfusedOptimizer``, fp32 copies flat or per parameter), ``"hp"``
    (ZeRO 1/2 and DeepSpeed's ``BF16_Optimizer``: ``_hp_mapping`` fragments of flat partitions),
    ``"zero3"``.
    """

    def __init__(self, engine: Any) -> None:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

        opt = engine.optimizer
        self.opt = opt
        # local mode: parameter -> (the tensor the inner optimizer keys its state by, offset, numel)
        self.local: dict[torch.nn.Parameter, tuple[torch.Tensor, int, int]] = {}
        params = list(engine.module.parameters())
        if isinstance(opt, torch.optim.Optimizer):  # DeepSpeed's wrappers are not
            self.mode, self.inner = "local", opt
            for group in opt.param_groups:
                self.local.update({p: (p, 0, p.numel()) for p in group["params"]})
        elif isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
            self.mode, self.inner = "zero3", opt.optimizer
        elif params and all(hasattr(p, "_hp_mapping") for p in params):
            self.mode, self.inner = "hp", opt.optimizer
        elif hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer: an fp32 copy per parameter
            self.mode, self.inner = "local", opt.optimizer
            for lp_group, fp32_group in zip(opt.fp16_groups, opt.fp32_groups):
                self.local.update({lp: (hp, 0, hp.numel()) for lp, hp in zip(lp_group, fp32_group)})
        elif hasattr(opt, "fp32_groups_flat"):  # FP16_Optimizer: one flat fp32 copy per group
            self.mode, self.inner = "local", opt.optimizer
            for lp_group, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
                offset = 0  # _flatten_dense_tensors packs the group's parameters in order
                for lp in lp_group:
                    self.local[lp] = (flat, offset, lp.numel())
                    offset += lp.numel()
        else:
            raise ValueError(
                f"resuming on another layout needs per-parameter access to the optimizer; "
                f"{type(opt).__name__} (ZeRO stage {engine.zero_optimization_stage()}, "
                f"{_precision(engine)}) has none"
            )
        missing = [p for p in params if self.mode == "local" and p not in self.local]
        if missing:
            raise ValueError(
                f"{len(missing)} model parameter(s) are not in the optimizer "
                f"{type(opt).__name__}: resuming on another layout needs every parameter trained"
            )

    def _flat_partitions(self) -> list[tuple[list[Any] | None, torch.Tensor]]:
        """(lp parameters, flat fp32 partition) per group: what the inner optimizer steps."""
        opt = self.opt
        if self.mode == "zero3":
            return [(None, flat) for flat in opt.fp32_partitioned_groups_flat]
        if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO 1/2
            return list(zip(opt.bit16_groups, opt.single_partition_of_fp32_groups))
        return list(zip(opt.bf16_groups, opt.fp32_groups_flat_partition))  # BF16_Optimizer

    def _owners(self) -> list[torch.Tensor]:
        """The tensors the inner optimizer keys its state by, each once."""
        if self.mode != "local":
            return [flat for _, flat in self._flat_partitions()]
        return list({id(owner): owner for owner, _, _ in self.local.values()}.values())

    def relink(self) -> None:
        """Point every parameter's ``_hp_mapping`` at its group's optimizer state. DeepSpeed
        0.19.8 links them once, right after the first group's first ``step()``, when the other
        groups (ours: the no-weight-decay group) have no state yet; their fragments then lack
        ``exp_avg``/``exp_avg_sq`` and ``safe_get_full_optimizer_state`` fails."""
        if self.mode != "hp":
            return
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        for lp_params, flat in self._flat_partitions():
            if self.inner.state.get(flat):
                lazy_init_hp_params_optimizer_state(lp_params, flat, self.inner.state)

    # -- reading (collective over data parallelism for ZeRO 1/2/3) --
    def state_keys(self) -> list[str]:
        """Optimizer state tensors kept per element (Adam: exp_avg, exp_avg_sq)."""
        for owner, state in self.inner.state.items():
            return sorted(
                k
                for k, v in state.items()
                if torch.is_tensor(v) and v.dim() > 0 and v.shape == owner.shape
            )
        return []

    def step(self) -> int | None:
        steps = {
            int(float(state["step"])) for state in self.inner.state.values() if "step" in state
        }
        if len(steps) > 1:
            logger.warning("optimizer state has several step counts %s; saving the largest", steps)
        return max(steps) if steps else None

    def _local_view(self, param: torch.nn.Parameter, key: str) -> torch.Tensor:
        owner, offset, numel = self.local[param]
        source = owner if key == MASTER_KEY else self.inner.state[owner][key]
        return source.detach().view(-1).narrow(0, offset, numel)

    def get(self, param: torch.nn.Parameter, key: str) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if self.mode == "local":
            tensor = self._local_view(param, key)
        elif key == MASTER_KEY:
            tensor = safe_get_full_fp32_param(param)
        else:
            tensor = safe_get_full_optimizer_state(param, key)
        return tensor.detach().float().cpu().contiguous().reshape(_full_shape(param))

    # -- writing --
    def create_state(self, step: int, keys: list[str]) -> None:
        """Fresh zero moments at ``step`` for every parameter, shaped as the optimizer would make
        them (its state is created lazily by the first ``step()``), linked to DeepSpeed's
        per-parameter fragments so ``safe_set_full_optimizer_state`` reaches them."""
        tensor_step = isinstance(self.inner, (torch.optim.Adam, torch.optim.AdamW))

        def make_step(like: torch.Tensor) -> Any:
            if not tensor_step:
                return step  # DeepSpeed's FusedAdam / CPU Adam count in Python ints
            group = self.inner.param_groups[0]
            on_device = group.get("capturable") or group.get("fused")
            dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            return torch.tensor(float(step), dtype=dtype, device=like.device if on_device else None)

        for owner in self._owners():
            state = self.inner.state[owner]
            state.clear()
            state["step"] = make_step(owner)
            for key in keys:
                state[key] = torch.zeros_like(owner, memory_format=torch.preserve_format)
        if self.mode == "hp":
            from deepspeed.utils import lazy_init_hp_params_optimizer_state

            for lp_params, flat in self._flat_partitions():
                lazy_init_hp_params_optimizer_state(lp_params, flat, self.inner.state)

    def set(self, param: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if self.mode == "local":
            self._local_view(param, key).copy_(value.reshape(-1))
            if key == MASTER_KEY:
                param.data.copy_(value.reshape(param.shape))  # the weights (a no-op in fp32)
            return
        value = value.to(getattr(param, "ds_tensor", param).device)
        if key == MASTER_KEY:
            if self.mode == "hp":
                param.data.copy_(value.to(param.dtype))  # the module weights (ZeRO 3: finish)
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)

    def finish(self) -> None:
        """ZeRO 3: the module's partitions are separate from the fp32 masters; copy them over
        (what DeepSpeed's own universal loader does)."""
        if self.mode != "zero3":
            return
        opt = self.opt
        for lp_flat, fp32_flat in zip(
            opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat
        ):
            if lp_flat is None:
                raise ValueError(
                    "resuming on another layout with ZeRO 3 parameter offload to NVMe is not "
                    "supported"
                )
            lp_flat.data.copy_(fp32_flat.data)


# ---- save -------------------------------------------------------------------------------------
def _json_safe(state: dict[str, Any]) -> dict[str, Any]:
    """The JSON-representable part of a scheduler's ``state_dict()`` (numbers, strings, lists)."""
    out = {}
    for key, value in state.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


def _loss_scaler(optimizer: Any) -> Any:
    """The object holding DeepSpeed's (dynamic) loss scale: ZeRO's ``loss_scaler``; at ZeRO 0
    DeepSpeed 0.19.8's fp16 wrappers keep it in their ``loss_scale_config``."""
    scaler = getattr(optimizer, "loss_scaler", None)
    return scaler if scaler is not None else getattr(optimizer, "loss_scale_config", None)


def _loss_scaler_state(engine: Any) -> dict[str, Any] | None:
    scaler = _loss_scaler(engine.optimizer)
    if scaler is None:
        return None
    fields = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
    values = {f: getattr(scaler, f, None) for f in fields}
    return {f: float(v) for f, v in values.items() if v is not None}  # None: a static scale


def _save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from megatron_glm.atomic_files import replacing

    with replacing(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def save_layout_free_state(
    engine: Any, tag_dir: Path, config: dict[str, Any], iteration: int, consumed_samples: int
) -> int | None:
    """Write this rank's share of the layout-free state into ``tag_dir``; every rank calls it
    (ZeRO gathers are collective). Returns the bytes this rank wrote, ``None`` when the run has
    nothing to write it from (no model config, or an optimizer without per-parameter access)."""
    if "model" not in config or not hasattr(engine, "module") or not hasattr(engine, "mpu"):
        return None
    try:
        optimizer = _Optimizer(engine)
    except ValueError as err:
        logger.warning("no layout-free state in this checkpoint: %s", err)
        return None
    start = time.perf_counter()
    model_config = GLMConfig(**config["model"])
    partitions = partition_of(model_config)
    mpu = engine.mpu
    tp_rank, pp_rank = mpu.get_slice_parallel_rank(), mpu.get_pipe_parallel_rank()
    dp_rank, dp_size = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    optimizer.relink()
    keys = optimizer.state_keys()

    # Every data-parallel peer walks the same list (the gathers are collective); the peers take
    # turns keeping the result.
    mine: dict[str, torch.Tensor] = {}
    owned = [
        (name, param)
        for name, param in _named_parameters(engine, model_config)
        if not getattr(param, "ds_pipe_replicated", False)
        and (partitions[name] is not None or tp_rank == 0)
    ]
    for index, (name, param) in enumerate(owned):
        writer = index % dp_size == dp_rank
        if not writer and optimizer.mode == "local":
            continue  # nothing collective at ZeRO 0: every peer holds the whole state
        for what in (MASTER_KEY, *keys):
            tensor = optimizer.get(param, what)
            if writer:
                mine[_key(what, tp_rank, name)] = tensor
    out_dir = Path(tag_dir) / LAYOUT_FREE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / rank_file_name(tp_rank, pp_rank, dp_rank)
    _save_file(mine, path, {"format": str(FORMAT_VERSION)})

    if dist.get_rank() == 0:
        scheduler = getattr(engine, "lr_scheduler", None)
        training = config.get("training", {})
        state = {
            "format": FORMAT_VERSION,
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "layout": asdict(
                Layout(
                    int(training.get("tensor_model_parallel_size", 1)),
                    int(training.get("pipeline_model_parallel_size", 1)),
                    dp_size,
                    engine.zero_optimization_stage(),
                    _precision(engine),
                )
            ),
            "global_batch_size": int(engine.train_batch_size()),
            "micro_batch_size": int(engine.train_micro_batch_size_per_gpu()),
            "optimizer": {
                "type": type(optimizer.inner).__name__,
                "step": optimizer.step(),
                "state_keys": keys,
            },
            "lr_scheduler": None if scheduler is None else _json_safe(scheduler.state_dict()),
            "engine": {
                "global_steps": int(engine.global_steps),
                "global_samples": int(engine.global_samples),
                "skipped_steps": int(engine.skipped_steps),
            },
            "loss_scaler": _loss_scaler_state(engine),
            "model": config["model"],
        }
        from megatron_glm.atomic_files import atomic_write_text

        atomic_write_text(out_dir / STATE_FILE, json.dumps(state, indent=2, sort_keys=True))
    written = path.stat().st_size
    logger.debug(
        "layout-free state: %d tensors, %.1f MB in %.3f s",
        len(mine),
        written / 1e6,
        time.perf_counter() - start,
    )
    return written


# ---- load -------------------------------------------------------------------------------------
class _SavedTensors:
    """Lazy reader over every ``*.safetensors`` file of a layout-free state."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self.files: dict[str, Path] = {}
        self.handles: dict[Path, Any] = {}
        paths = sorted(directory.glob("*.safetensors"))
        if not paths:
            raise CheckpointError([f"{directory}: no .safetensors files"])
        self.names = {path.name for path in paths}
        for path in paths:
            try:
                handle = safe_open(str(path), framework="pt")
                names = list(handle.keys())
            except Exception as err:  # safetensors raises its own error types for a bad header
                raise CheckpointError([f"{path}: not a readable safetensors file ({err})"]) from err
            self.handles[path] = handle
            for key in names:
                self.files[key] = path

    def get(self, key: str) -> torch.Tensor:
        return self.handles[self.files[key]].get_tensor(key)


def _check_batch(state: dict[str, Any], engine: Any, tag_dir: Path) -> None:
    saved, now = int(state["global_batch_size"]), int(engine.train_batch_size())
    if saved != now:
        raise ValueError(
            f"checkpoint {tag_dir} was trained with a global batch of {saved} samples per "
            f"iteration, this run uses {now}: the data position (consumed samples) and the LR "
            f"schedule are counted in global batches, so a resume on another layout must keep "
            f"train_batch_size = {saved} (micro batch x gradient accumulation x data-parallel size)"
        )
    micro = int(engine.train_micro_batch_size_per_gpu())
    if int(state["micro_batch_size"]) != micro:
        logger.warning(
            "micro batch %d instead of the checkpoint's %d: the same samples follow, but blank "
            "infilling draws its per-micro-batch choices (objective, single span, short sequence) "
            "from where each micro-batch starts, so unless those are fixed (--bert-prob 1, no "
            "single-span or short-sequence draws) the masks differ from the original run's",
            micro,
            int(state["micro_batch_size"]),
        )


def _resharded(
    reader: _SavedTensors,
    what: str,
    name: str,
    partition: Partition | None,
    saved_tp: int,
    tp_rank: int,
    tp_size: int,
) -> torch.Tensor:
    if partition is None or saved_tp == 1:
        full = reader.get(_key(what, 0, name))
    else:
        pieces = [reader.get(_key(what, r, name)) for r in range(saved_tp)]
        full = gather_tensor_shards(pieces, partition.dim, partition.stride)
    if partition is None or tp_size == 1:
        return full
    return shard_tensor(full, partition.dim, partition.stride, tp_rank, tp_size)


def _missing_keys(
    reader: _SavedTensors,
    names: list[str],
    partitions: dict[str, Partition | None],
    saved_tp: int,
    whats: list[str],
) -> list[str]:
    missing = []
    for name in names:
        ranks = range(saved_tp) if partitions[name] is not None else range(1)
        missing += [
            _key(w, r, name) for w in whats for r in ranks if _key(w, r, name) not in reader.files
        ]
    return missing


def _fresh_rng_states(seed: int, iteration: int, tp_rank: int, pp_rank: int) -> dict[str, Any]:
    """Dropout streams for a resumed run of another layout: the original streams belong to ranks
    that no longer exist. Seeded like a new run (``Trainer``: seed + 100 x stage, TP tracker) but
    from a seed derived from the iteration, so the resumed steps do not replay the masks of the
    run's first steps. The streams in use now are left as they are."""
    from megatron_glm.parallel.random import (
        get_all_rng_states,
        model_parallel_seed,
        set_all_rng_states,
    )

    current = get_all_rng_states()
    derived = (seed + 1_000_003 * iteration) % 2**31
    model_parallel_seed(derived + 100 * pp_rank, tp_rank)
    fresh = get_all_rng_states()
    set_all_rng_states(current)
    return fresh


@dataclass
class ReshardedState:
    iteration: int
    consumed_samples: int
    rng_states: dict[str, Any]


def load_layout_free_state(
    engine: Any,
    tag_dir: Path,
    state: dict[str, Any],
    *,
    load_optimizer: bool,
    load_lr_scheduler: bool,
    current: Layout,
    seed: int,
) -> ReshardedState:
    """Set ``engine`` (built for ``current``) from the layout-free state of ``tag_dir``."""
    tag_dir = Path(tag_dir)
    start = time.perf_counter()
    if int(state.get("format", 0)) != FORMAT_VERSION:
        raise CheckpointError(
            [
                f"{tag_dir / LAYOUT_FREE_DIR / STATE_FILE}: format {state.get('format')}, "
                f"this version reads {FORMAT_VERSION}"
            ]
        )
    _check_batch(state, engine, tag_dir)
    saved = saved_layout(state)
    model_config = GLMConfig(**state["model"])
    partitions = partition_of(model_config)
    optimizer = _Optimizer(engine)
    mpu = engine.mpu
    tp_rank, pp_rank = mpu.get_slice_parallel_rank(), mpu.get_pipe_parallel_rank()
    params = list(_named_parameters(engine, model_config))

    # The architecture must be the checkpoint's: every parameter's partition has the shape the
    # saved config gives it at this TP size.
    from megatron_glm.conversion.canonical import canonical_shapes

    shapes = canonical_shapes(model_config)
    problems = []
    for name, param in params:
        if name not in shapes:
            problems.append(f"{name}: not a parameter of the checkpoint's model")
            continue
        want = list(shapes[name])
        part = partitions[name]
        if part is not None:
            want[part.dim] //= current.tensor
        if list(_full_shape(param)) != want:
            problems.append(
                f"{name}: this run's partition has shape {list(_full_shape(param))}, the "
                f"checkpoint's model gives {want} at tensor parallel size {current.tensor}"
            )
    if problems:
        raise CheckpointError([f"{tag_dir}: the model does not match the checkpoint", *problems])

    reader = _SavedTensors(tag_dir / LAYOUT_FREE_DIR)
    keys = list(state["optimizer"]["state_keys"]) if load_optimizer else []
    names = sorted({name for name, _ in params})
    missing = _missing_keys(reader, names, partitions, saved.tensor, [MASTER_KEY, *keys])
    if missing:
        raise CheckpointError(
            [
                f"{tag_dir / LAYOUT_FREE_DIR}: {len(missing)} tensor(s) missing: "
                f"{', '.join(missing[:8])}"
            ]
        )

    step = state["optimizer"]["step"]
    if load_optimizer and step is not None:
        optimizer.create_state(int(step), keys)
    with torch.no_grad():
        for name, param in params:
            for what in (MASTER_KEY, *keys):
                value = _resharded(
                    reader, what, name, partitions[name], saved.tensor, tp_rank, current.tensor
                )
                optimizer.set(param, what, value)
        optimizer.finish()

    if load_lr_scheduler and state.get("lr_scheduler") is not None:
        scheduler = engine.lr_scheduler
        scheduler.load_state_dict({**scheduler.state_dict(), **state["lr_scheduler"]})
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # what the optimizer's saved param_groups would have restored
    counters = state["engine"]
    engine.global_steps = counters["global_steps"]
    engine.global_samples = counters["global_samples"]
    engine.skipped_steps = counters["skipped_steps"]
    scaler = _loss_scaler(engine.optimizer)
    # only fp16 scales dynamically; bf16/fp32 keep a static 1, which an fp16 scale must not replace
    fp16_both = saved.precision == current.precision == "fp16"
    if load_optimizer and fp16_both and scaler is not None and state.get("loss_scaler"):
        for field, value in state["loss_scaler"].items():
            if hasattr(scaler, field):
                kept = getattr(scaler, field)
                setattr(
                    scaler, field, type(kept)(value) if isinstance(kept, (int, float)) else value
                )

    if dist.get_rank() == 0:
        logger.info(
            "resumed %s (saved at %s) on %s in %.2f s: weights%s, LR schedule %s; %s",
            tag_dir,
            saved.describe(),
            current.describe(),
            time.perf_counter() - start,
            " and optimizer state" if load_optimizer else " only (fresh optimizer)",
            "restored" if load_lr_scheduler else "fresh",
            "dropout streams reseeded for the new ranks"
            if saved != current
            else "the same ranks: their saved dropout streams continue",
        )
    return ReshardedState(
        int(state["iteration"]),
        int(state["consumed_samples"]),
        _fresh_rng_states(seed, int(state["iteration"]), tp_rank, pp_rank),
    )


# ---- the weights alone (the ``deepspeed`` checkpoint form) -----------------------------------
def read_master_weights(
    tag_dir: Path, config: GLMConfig
) -> tuple[list[dict[str, torch.Tensor]], Layout]:
    """The fp32 master weights of ``tag_dir``'s layout-free state, one dict per saved TP rank
    (that rank's partition of each canonical name; a replicated name is TP rank 0's copy in
    every dict), and the layout that saved them. For a reader of the weights when DeepSpeed's
    module files hold none (ZeRO 3). ``CheckpointError`` naming the file for a missing,
    unexpected or unreadable file or tensor."""
    from megatron_glm.conversion.canonical import canonical_names

    directory = Path(tag_dir) / LAYOUT_FREE_DIR
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        layout = saved_layout(state)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError([f"{path}: cannot be read ({type(err).__name__}: {err})"]) from None
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            [f"{path}: format {state.get('format')}, this version reads {FORMAT_VERSION}"]
        )
    wanted = {
        rank_file_name(t, p, d)
        for t in range(layout.tensor)
        for p in range(layout.pipeline)
        for d in range(layout.data)
    }
    reader = _SavedTensors(directory)
    problems = [f"{directory / name}: missing" for name in sorted(wanted - reader.names)]
    problems += [
        f"{directory / name}: unexpected ({layout.describe()} writes {len(wanted)} files)"
        for name in sorted(reader.names - wanted)
    ]
    if problems:
        raise CheckpointError(problems)
    partitions = partition_of(config)
    names = canonical_names(config)
    missing = _missing_keys(reader, names, partitions, layout.tensor, [MASTER_KEY])
    if missing:
        raise CheckpointError(
            [f"{directory}: {len(missing)} tensor(s) missing: {', '.join(missing[:8])}"]
        )
    shards = [
        {
            name: reader.get(_key(MASTER_KEY, rank if partitions[name] is not None else 0, name))
            for name in names
        }
        for rank in range(layout.tensor)
    ]
    return shards, layout
