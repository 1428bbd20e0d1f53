"""The resolved configuration of a run as text: what ``--dry-run`` prints and rank 0 logs at start-up."""

from __future__ import annotations

import json

from megatron_glm.training.arguments import RunConfig


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def describe_run(run: RunConfig, *, with_ds_json: bool = True) -> str:
    """Model size, lengths, layout, batch arithmetic, precision, schedule, data, notes and the
    DeepSpeed JSON exactly as ``deepspeed.initialize`` will get it."""
    m, t, d, ds = run.model, run.training, run.data, run.ds
    plan = d.shape_plan
    tp, pp = t.tensor_model_parallel_size, t.pipeline_model_parallel_size
    peak = ds.peak_lr
    final = peak * t.final_lr_ratio(peak)
    lines = [
        f"command-line dialect: {run.dialect}",
        f"model: {_count(m.num_parameters())} parameters ({m.num_layers} layers, hidden "
        f"{m.hidden_size}, {m.num_attention_heads} heads, ffn {m.ffn_hidden_size}, vocab "
        f"{m.vocab_size} padded to {m.padded_vocab_size}, max position "
        f"{m.max_sequence_length}, attention {m.attention_backend}, recompute "
        f"{'on' if m.checkpoint_activations else 'off'})",
        f"lengths: raw sample {plan.raw_length} tokens (--seq-length), model input "
        f"{plan.input_length} = raw + 2 x {plan.max_spans} (span cap)",
        f"layout: world {run.world_size} = tensor {tp} x pipeline {pp} x data "
        f"{ds.data_parallel_size}",
        f"batch: {ds.train_batch_size} samples per iteration = micro {ds.micro_batch_size} x "
        f"accumulation {ds.gradient_accumulation_steps} x data-parallel {ds.data_parallel_size}; "
        f"{ds.train_batch_size * plan.input_length} input tokens per iteration",
        f"precision {ds.precision}, ZeRO stage {ds.zero_stage}"
        f"{' (optimizer offload)' if ds.offload_optimizer else ''}, gradient clipping "
        f"{ds.gradient_clipping}, weight decay {ds.weight_decay}",
        f"schedule: {t.train_iters} iterations, LR {peak:g} -> {final:g} ({t.lr_decay_style} "
        f"over {t.decay_iters}, warmup {t.warmup_iters}), loss mean: {t.loss_normalization}",
        f"data: {' '.join(d.data_path)} split {d.split}, seed {d.seed}, tokenizer "
        f"{d.tokenizer_type}" + (f" ({d.tokenizer_model_type})" if d.tokenizer_model_type else ""),
        (
            f"checkpoints: save {t.save} "
            + (f"every {t.save_interval} iterations and " if t.save_interval else "")
            + "at the end"
            if t.save
            else "checkpoints: not saved (no --save)"
        )
        + f", load {t.load or '-'}; validation "
        + (f"every {t.eval_interval} ({t.eval_iters} batches)" if t.eval_interval else "off"),
    ]
    lines += [f"note: {note}" for note in run.notes]
    if with_ds_json:
        lines.append("DeepSpeed config: " + json.dumps(ds.config, sort_keys=True))
    return "\n".join(lines)
