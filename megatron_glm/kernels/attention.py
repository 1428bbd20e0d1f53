"""Attention with GLM's Part A / Part B mask, behind interchangeable backends.

The mask and the reference numerics: docs/model.md#inputs-2d-positions-and-the-mask and
docs/model.md#attention-backends.

Shape legend: b batch, n heads (per TP rank), sq queries, sk keys, d head dim.

Query ``i`` sits at key position ``i + sk - sq`` (so a KV cache, ``sq < sk``, uses the same call and
sees every cached position), and may attend to key ``j`` iff ``j < sep or j <= i + sk - sq``: Part A
(the first ``sep`` tokens) is bidirectional, Part B is causal and sees all of Part A, and padding
after Part B is never seen by a real token. The mask is described by ``sep`` alone (plus, for
generation, an optional ``key_mask [b, sk]`` that hides padding keys inside the sequence); each
backend decides how to apply it:

- ``dense``: the reference, as the official GLM computes it: ``scores = q @ (k / sqrt(d))^T``,
  masked scores set to -65504, softmax in the input dtype, dropout, ``@ v``. Materialises
  ``[b, n, sq, sk]`` scores.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with one boolean mask
  ``[b, 1, sq, sk]`` broadcast over heads (never a per-head mask).
- ``fused``: the dense computation in one hand-written autograd function, for CPU training where
  SDPA is slow (bf16) or has no fused kernel (dropout): the mask is added (0 / -65504, vectorised)
  and the softmax normalised in place on the scores; dropout is ``kernels.dropout``'s bitwise mask
  (15 random bits per element, a quarter of a generator draw in bf16, instead of a Bernoulli draw
  and two multiplies), and the ``1/(1-p)`` scale is applied to the ``[b, n, sq, d]`` output instead
  of the ``[b, n, sq, sk]`` probabilities. With ``recompute=True`` (Megatron's selective
  recomputation of the attention core, the model's default) only q, k, v and the generator state
  are kept for backward, which recomputes scores and softmax and replays the mask: nothing of size
  ``[b, n, sq, sk]`` is held across the step, and forward and backward make the scores a few heads
  of one sample at a time (at most 4M elements), never the whole ``[b, n, sq, sk]``. Without it
  the probabilities and the mask are kept.
- ``flex``: ``torch.nn.attention.flex_attention`` with a block-sparse ``BlockMask`` built from the
  same predicate, compiled on CUDA. No attention dropout; on CPU it runs the unfused forward only
  (torch has no CPU backward for it) - use it on CPU for checks, not training.
- Every backend but ``sdpa`` and ``flex`` multiplies through ``kernels.matmul``: on a CPU where
  torch has no fast bf16 product it computes bf16 products in fp32 (rounded once).
- ``auto``: ``flex`` on CUDA when dropout is inactive; on CPU ``fused`` while attention dropout is
  active (``resolve_backend`` says why) and for 16-bit inputs (decided per call from the dtype),
  except where 16-bit products are computed in fp32 (no AVX512): there 16-bit inputs without
  dropout take ``sdpa`` on fp32 copies; else ``sdpa``.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from megatron_glm.kernels.dropout import apply_keep_bits_, keep_bits
from megatron_glm.kernels.matmul import gemm_in_fp32, matmul

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "PreparedMask",
    "allowed_mask",
    "attention",
    "flex_available",
    "prepare_attention_mask",
    "resolve_backend",
]

BACKENDS = ("auto", "dense", "fused", "sdpa", "flex")
# The official code's "minus infinity": the most negative fp16 value, so fp16 scores stay finite.
MASK_VALUE = -65504.0

try:  # flex_attention exists from torch 2.5 on
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    _FLEX_IMPORT_ERROR: str | None = None
except ImportError as error:  # pragma: no cover - depends on the torch build
    _FLEX_IMPORT_ERROR = str(error)

_compiled_flex: Any = None


def flex_available() -> bool:
    """Whether this torch build ships ``flex_attention``."""
    return _FLEX_IMPORT_ERROR is None


def resolve_backend(backend: str, device: torch.device, dropout_active: bool = False) -> str:
    """The concrete backend ``backend`` means on ``device`` (``auto`` is resolved, others kept)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    # flex has no dropout, so training with attention dropout stays on SDPA.
    if device.type == "cuda" and flex_available() and not dropout_active:
        return "flex"
    # With dropout, torch's CPU SDPA falls back to an unfused path that is slower than the dense
    # reference and, in bf16, needs 1.6-1.8x its memory (benchmarks/README.md).
    if device.type == "cpu" and dropout_active:
        return "fused"
    return "sdpa"


def allowed_mask(
    sep: torch.Tensor, sq: int, sk: int, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean ``[b, 1, sq, sk]``: True where query ``i`` may attend to key ``j``; with
    ``key_mask [b, sk]`` also only where ``key_mask[b, j]``."""
    device = sep.device
    query_pos = torch.arange(sk - sq, sk, device=device).view(1, sq, 1)  # key position of query i
    key_pos = torch.arange(sk, device=device).view(1, 1, sk)
    allowed = (key_pos < sep.view(-1, 1, 1)) | (key_pos <= query_pos)  # [b, sq, sk]
    if key_mask is not None:
        allowed = allowed & key_mask.view(-1, 1, sk)
    return allowed.unsqueeze(1)  # [b, 1, sq, sk]: one mask for every head


@dataclass
class PreparedMask:
    """A mask built once for ``(sep, sq, sk, backend)`` and reused by every layer of a forward."""

    backend: str
    sq: int
    sk: int
    batch: int
    dense: torch.Tensor | None = None  # [b, 1, sq, sk] bool for dense / fused / sdpa
    block: Any = None  # BlockMask for flex
    auto: bool = False  # chosen by "auto": sdpa becomes fused for 16-bit inputs on CPU
    additive: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)  # fused, per dtype

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """``[b, 1, sq, sk]`` of ``dtype``: 0 where allowed, -65504 elsewhere (built once)."""
        if dtype not in self.additive:
            assert self.dense is not None
            zeros = torch.zeros(self.dense.shape, dtype=dtype, device=self.dense.device)
            self.additive[dtype] = zeros.masked_fill_(~self.dense, MASK_VALUE)
        return self.additive[dtype]


def _check_sep(sep: torch.Tensor, batch: int, sk: int) -> None:
    if not isinstance(sep, torch.Tensor):
        raise ValueError(f"sep must be an integer tensor of shape [{batch}], got {type(sep)}")
    if sep.dtype.is_floating_point or sep.dtype.is_complex or sep.dtype == torch.bool:
        raise ValueError(f"sep must be an integer tensor, got dtype {sep.dtype}")
    if sep.dim() != 1 or sep.shape[0] != batch:
        raise ValueError(
            f"sep must have shape [{batch}] (one Part A length per sample), got {tuple(sep.shape)}"
        )
    if batch:
        low, high = int(sep.min()), int(sep.max())
        if low < 0 or high > sk:
            raise ValueError(
                f"sep values must lie in [0, {sk}] (the key length), got min {low} "
                f"max {high}: {sep.tolist()}"
            )


def prepare_attention_mask(
    sep: torch.Tensor,
    sq: int,
    sk: int,
    backend: str,
    dropout_active: bool = False,
    key_mask: torch.Tensor | None = None,
) -> PreparedMask:
    """Validate ``sep`` and build the mask ``backend`` needs (``auto`` is resolved here).

    ``key_mask``: optional boolean ``[b, sk]``, False for keys no query may see (the padding a
    batched KV cache leaves between the rows' Part A and Part B, docs/generation.md)."""
    batch = sep.shape[0] if isinstance(sep, torch.Tensor) and sep.dim() == 1 else -1
    _check_sep(sep, batch, sk)
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (batch, sk)):
        raise ValueError(
            f"key_mask must be a bool tensor of shape [{batch}, {sk}], got "
            f"{key_mask.dtype} {tuple(key_mask.shape)}"
        )
    return _build_mask(sep, sq, sk, backend, dropout_active, key_mask)


def _build_mask(
    sep: torch.Tensor,
    sq: int,
    sk: int,
    backend: str,
    dropout_active: bool,
    key_mask: torch.Tensor | None = None,
) -> PreparedMask:
    batch = sep.shape[0]
    if sq > sk:
        raise ValueError(f"more queries than keys: sq={sq} > sk={sk}")
    concrete = resolve_backend(backend, sep.device, dropout_active)
    if concrete == "flex":
        if not flex_available():
            raise ValueError(
                f"attention backend 'flex' needs torch.nn.attention.flex_attention, "
                f"unavailable in torch {torch.__version__}: {_FLEX_IMPORT_ERROR}"
            )
        offset = sk - sq
        sep_long = sep.to(torch.long)

        def mask_mod(
            b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
        ) -> torch.Tensor:
            allowed = (kv_idx < sep_long[b]) | (kv_idx <= q_idx + offset)
            return allowed if key_mask is None else allowed & key_mask[b, kv_idx]

        # H=None: the mask is the same for every head, so the block map is stored once per sample.
        block = create_block_mask(mask_mod, batch, None, sq, sk, device=sep.device)
        return PreparedMask(concrete, sq, sk, batch, block=block)
    dense = allowed_mask(sep, sq, sk, key_mask)
    return PreparedMask(concrete, sq, sk, batch, dense=dense, auto=backend == "auto")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [b, n, s, d], got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    b, n, sq, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, n, d):
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, heads or head dim"
        )
    if sq > k.shape[2]:
        raise ValueError(f"more queries than keys: q has {sq}, k has {k.shape[2]}")


def _dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    dropout_p: float,
    training: bool,
) -> torch.Tensor:
    # Official order: scale k before the product (keeps fp16 scores in range).
    scores = matmul(q, (k / math.sqrt(q.shape[-1])).transpose(-1, -2))  # [b, n, sq, sk]
    scores = scores.masked_fill(~allowed, MASK_VALUE)
    probs = torch.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout_p, training=training)
    return matmul(probs, v)  # [b, n, sq, d]


def _masked_softmax(q: torch.Tensor, k: torch.Tensor, additive: torch.Tensor) -> torch.Tensor:
    """``softmax(q (k / sqrt(d))^T + additive)`` ``[b, n, sq, sk]``, masked and normalised in place.

    The mask is added (0 or -65504, broadcast over heads) rather than ``masked_fill``ed: the add
    is vectorised, a bool-masked fill is not (10x slower on CPU)."""
    scores = matmul(q, (k / math.sqrt(q.shape[-1])).transpose(-1, -2))  # [b, n, sq, sk]
    scores.add_(additive)
    # In place (checked equal to torch.softmax by tests/kernels/test_attention.py): the CPU
    # kernel reads a row before writing it, so no second [b, n, sq, sk] buffer is needed.
    return torch._softmax(scores, -1, False, out=scores)


def _generator_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index or 0].get_state()
    return torch.default_generator.get_state()


def _replay_generator(device: torch.device, state: torch.Tensor) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.set_state(state)
    return generator


# With recomputation the scores are made for a few heads of one sample at a time, at most this many
# elements: a whole [b, n, s, s] buffer is 128 MB in bf16 at b 2, 8 heads, s 2048 (and twice that
# in backward), one head's 8 MB stays in cache between the product, the softmax and the dropout.
_SCORE_CHUNK_ELEMENTS = 1 << 22


def _score_chunks(b: int, n: int, sq: int, sk: int, recompute: bool) -> list[tuple[Any, slice]]:
    """``(sample, heads)`` index pairs covering ``[b, n]``; the whole at once without recompute
    (its saved probabilities and mask are whole tensors anyway)."""
    if not recompute:
        return [(slice(None), slice(None))]
    per = max(1, _SCORE_CHUNK_ELEMENTS // (sq * sk))
    return [(i, slice(h, min(h + per, n))) for i in range(b) for h in range(0, n, per)]


class _FusedAttention(torch.autograd.Function):
    """The ``fused`` backend: dense attention with in-place masking, softmax and dropout, a chunk
    of heads at a time with recomputation (``_score_chunks``); the dropout masks of the chunks are
    drawn in order from one generator, which backward replays in the same order."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        additive: torch.Tensor,
        dropout_p: float,
        recompute: bool,
    ) -> torch.Tensor:
        b, n, sq, _ = q.shape
        rng_state = _generator_state(q.device) if dropout_p > 0.0 else None
        out = q.new_empty(b, n, sq, v.shape[-1])  # [b, n, sq, d]
        probs = bits = None
        scale = 1.0
        for i, heads in _score_chunks(b, n, sq, k.shape[2], recompute):
            probs = _masked_softmax(q[i, heads], k[i, heads], additive[i])  # [.., sq, sk]
            kept = probs
            if dropout_p > 0.0:
                bits, scale = keep_bits(probs.shape, dropout_p, probs.dtype, probs.device)
                # Recomputation rebuilds probs in backward; otherwise backward needs them intact.
                kept = apply_keep_bits_(probs if recompute else probs.clone(), bits)
            out[i, heads] = matmul(kept, v[i, heads])
            del kept
        if scale != 1.0:
            out.mul_(scale)
        ctx.recompute, ctx.dropout_p = recompute, dropout_p
        ctx.scale, ctx.rng_state = scale, rng_state
        if recompute:
            ctx.save_for_backward(q, k, v, additive)
        else:
            ctx.save_for_backward(q, k, v, additive, probs, bits)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, additive, *kept_for_backward = ctx.saved_tensors
        b, n, sq, _ = q.shape
        if ctx.scale != 1.0:
            grad_out = grad_out * ctx.scale
        replay = None
        if ctx.recompute and ctx.rng_state is not None:
            replay = _replay_generator(q.device, ctx.rng_state)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        scale = 1.0 / math.sqrt(q.shape[-1])
        for i, heads in _score_chunks(b, n, sq, k.shape[2], ctx.recompute):
            qc, kc, vc, grad_c = q[i, heads], k[i, heads], v[i, heads], grad_out[i, heads]
            if ctx.recompute:
                probs = _masked_softmax(qc, kc, additive[i])
                bits = None
                if replay is not None:
                    bits, _ = keep_bits(
                        probs.shape, ctx.dropout_p, probs.dtype, probs.device, replay
                    )
            else:
                probs, bits = kept_for_backward
            grad_probs = matmul(grad_c, vc.transpose(-1, -2))  # [.., sq, sk]
            if bits is not None:
                apply_keep_bits_(grad_probs, bits)
            # softmax backward in place (the kernel finishes a row's dot product before writing
            # it): grad_probs becomes the scores' gradient
            grad_scores = torch._softmax_backward_data(
                grad_probs, probs, -1, probs.dtype, grad_input=grad_probs
            )
            # Recomputed probs are this function's own, so they take the mask in place; saved
            # ones are left intact (a retained graph may run backward again).
            kept = probs
            if bits is not None:
                kept = apply_keep_bits_(probs if ctx.recompute else probs.clone(), bits)
            del bits, probs
            grad_v[i, heads] = matmul(kept.transpose(-1, -2), grad_c)  # [.., sk, d]
            del kept
            grad_q[i, heads] = matmul(grad_scores, kc).mul_(scale)  # [.., sq, d]
            grad_k[i, heads] = matmul(grad_scores.transpose(-1, -2), qc).mul_(scale)  # [.., sk, d]
            del grad_scores, grad_probs
        return grad_q, grad_k, grad_v, None, None, None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: Any) -> torch.Tensor:
    global _compiled_flex
    if q.device.type == "cuda":
        # Without compile flex_attention is an unfused reference that materialises the scores.
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError(
            f"flex_attention has no backward on {q.device.type} in torch {torch.__version__}: "
            "use backend='sdpa' (or 'dense') to train on CPU"
        )
    with warnings.catch_warnings():
        # The unfused CPU path is what we want here (a forward check); silence its advice.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sep: torch.Tensor,
    *,
    backend: str = "auto",
    dropout_p: float = 0.0,
    training: bool = False,
    mask: PreparedMask | None = None,
    recompute: bool = False,
) -> torch.Tensor:
    """Masked multi-head attention: ``q [b,n,sq,d]``, ``k, v [b,n,sk,d]``, ``sep [b]`` ->
    ``[b,n,sq,d]``.

    ``mask`` is an optional :func:`prepare_attention_mask` result for the same ``sep``/lengths
    (the model builds it once per forward); its backend then wins over ``backend``. Dropout on the
    attention probabilities is applied when ``training`` and ``dropout_p > 0`` (the caller owns the
    RNG state, e.g. the model-parallel RNG fork). ``flex`` cannot apply dropout. ``recompute``
    (``fused`` only) keeps just q, k, v and the generator state for backward, which recomputes the
    probabilities and replays the dropout mask.
    """
    _check_qkv(q, k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    b, _, sq, _ = q.shape
    sk = k.shape[2]
    dropout_active = training and dropout_p > 0.0
    if mask is None:
        _check_sep(sep, b, sk)
        mask = _build_mask(sep, sq, sk, backend, dropout_active)
    elif (mask.sq, mask.sk, mask.batch) != (sq, sk, b):
        raise ValueError(
            f"prepared mask is for (b, sq, sk)=({mask.batch}, {mask.sq}, {mask.sk}), "
            f"inputs are ({b}, {sq}, {sk})"
        )

    if mask.backend == "flex":
        if dropout_active:
            raise ValueError(
                f"the flex attention backend has no attention dropout "
                f"(dropout_p={dropout_p} in training): use backend 'sdpa' or 'dense'"
            )
        return _flex(q, k, v, mask.block)
    assert mask.dense is not None
    concrete = mask.backend
    if mask.auto and concrete == "sdpa" and q.device.type == "cpu" and q.element_size() == 2:
        # torch's CPU SDPA kernel is 2x slower than fused in bf16 (benchmarks/README.md); in fp32
        # without dropout it is faster, so the dtype decides (known only here, not when the mask
        # was prepared). Where 16-bit products run in fp32 anyway (kernels.matmul: no AVX512),
        # SDPA's fp32 kernel on fp32 copies is the fastest (q, k, v are small next to the scores
        # it never writes); its output is rounded once.
        if gemm_in_fp32(q):
            out = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask.dense
            )  # [b, n, sq, d]
            return out.to(q.dtype)
        concrete = "fused"
    if concrete == "dense":
        return _dense(q, k, v, mask.dense, dropout_p, training)
    if concrete == "fused":
        additive = mask.additive_mask(q.dtype)
        return _FusedAttention.apply(
            q, k, v, additive, dropout_p if dropout_active else 0.0, recompute
        )
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask.dense, dropout_p=dropout_p if training else 0.0
    )
