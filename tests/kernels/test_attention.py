"""Attention backends against the dense reference, and the dense reference against the spec."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from megatron_glm.kernels import allowed_mask, attention, prepare_attention_mask, resolve_backend

# the module (its name is shadowed in megatron_glm.kernels by the function it exports)
attention_module = importlib.import_module("megatron_glm.kernels.attention")


def _inputs(
    b: int, n: int, sq: int, sk: int, d: int, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, s, d, generator=g).to(dtype) for s in (sq, sk, sk))
    return q, k, v


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sep: list[int]) -> torch.Tensor:
    """Spec §2 written out per query: softmax over exactly the allowed keys (no mask value)."""
    b, n, sq, d = q.shape
    sk = k.shape[2]
    out = torch.zeros_like(q)
    for bi in range(b):
        for i in range(sq):
            pos = i + sk - sq
            keys = [j for j in range(sk) if j < sep[bi] or j <= pos]
            scores = torch.einsum("nd,nkd->nk", q[bi, :, i], k[bi, :, keys]) / math.sqrt(d)
            out[bi, :, i] = torch.einsum("nk,nkd->nd", torch.softmax(scores, -1), v[bi, :, keys])
    return out


CASES = [
    # (sq, sk, sep): full sequences (sep at 0, middle, sk) and KV-cache queries (sq < sk)
    (9, 9, [0, 4]),
    (9, 9, [9, 1]),
    (3, 11, [5, 0]),
    (1, 7, [7, 2]),
]


@pytest.mark.parametrize("sq,sk,sep", CASES)
def test_dense_reference_matches_spec(sq: int, sk: int, sep: list[int]) -> None:
    q, k, v = _inputs(2, 2, sq, sk, 8)
    out = attention(q, k, v, torch.tensor(sep), backend="dense")
    torch.testing.assert_close(out, _explicit(q, k, v, sep), rtol=1e-5, atol=1e-6)


def test_allowed_mask_is_shared_over_heads() -> None:
    mask = allowed_mask(torch.tensor([2, 0]), 4, 4)
    assert mask.shape == (2, 1, 4, 4) and mask.dtype == torch.bool
    expected0 = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=bool)
    assert torch.equal(mask[0, 0], expected0)
    assert torch.equal(mask[1, 0], torch.ones(4, 4, dtype=bool).tril())


@pytest.mark.parametrize("sq,sk,sep", CASES)
def test_sdpa_matches_dense_forward_and_backward_fp32(sq: int, sk: int, sep: list[int]) -> None:
    q, k, v = _inputs(2, 3, sq, sk, 16, seed=1)
    sep_t = torch.tensor(sep)
    grads = []
    outs = []
    for backend in ("dense", "sdpa"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, sep_t, backend=backend)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in leaves])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for g_sdpa, g_dense in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_sdpa, g_dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sq,sk,sep", CASES)
def test_flex_forward_matches_dense_on_cpu(sq: int, sk: int, sep: list[int]) -> None:
    q, k, v = _inputs(2, 2, sq, sk, 16, seed=2)
    sep_t = torch.tensor(sep)
    with torch.no_grad():
        ref = attention(q, k, v, sep_t, backend="dense")
        out = attention(q, k, v, sep_t, backend="flex")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_flex_has_no_cpu_backward() -> None:
    q, k, v = _inputs(1, 2, 8, 8, 16)
    q.requires_grad_()
    with pytest.raises(NotImplementedError, match="no backward on cpu"):
        attention(q, k, v, torch.tensor([3]), backend="flex")


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
def test_torch_flex_itself_has_no_cpu_backward() -> None:
    # Why the backend refuses: torch 2.13's own flex_attention raises for CPU inputs needing grad.
    # If this starts failing, torch gained a CPU backward: lift the restriction and the docs.
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = _inputs(1, 2, 8, 8, 16)
    q.requires_grad_()
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex_attention(q, k, v)


def test_flex_rejects_dropout_in_training() -> None:
    q, k, v = _inputs(1, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="no attention dropout"):
        attention(q, k, v, torch.tensor([3]), backend="flex", dropout_p=0.1, training=True)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_bf16_backends_match_dense_within_tolerance(backend: str) -> None:
    # bf16 keeps 8 mantissa bits (relative step 2**-8 = 0.4%); the backends round in different
    # places (dense rounds the scores and probabilities to bf16, the others accumulate in fp32),
    # so they agree with each other to a few bf16 steps of the O(1) outputs: atol 3e-2.
    q, k, v = _inputs(2, 4, 32, 32, 32, dtype=torch.bfloat16, seed=3)
    sep = torch.tensor([10, 25])
    with torch.no_grad():
        ref32 = attention(q.float(), k.float(), v.float(), sep, backend="dense")
        ref = attention(q, k, v, sep, backend="dense")
        out = attention(q, k, v, sep, backend=backend)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=3e-2)
    # and both are close to the fp32 computation of the same bf16 inputs
    torch.testing.assert_close(out.float(), ref32, rtol=0, atol=3e-2)


def test_auto_is_sdpa_on_cpu_and_prepared_mask_is_reused() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda"), dropout_active=True) == "sdpa"
    assert resolve_backend("auto", torch.device("cpu"), dropout_active=True) == "fused"
    q, k, v = _inputs(2, 2, 6, 6, 8)
    sep = torch.tensor([2, 5])
    mask = prepare_attention_mask(sep, 6, 6, "auto")
    assert mask.backend == "sdpa" and mask.dense is not None and mask.dense.shape == (2, 1, 6, 6)
    torch.testing.assert_close(
        attention(q, k, v, sep, mask=mask),
        attention(q, k, v, sep, backend="dense"),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("backend", ["dense", "sdpa"])
def test_dropout_only_in_training(backend: str) -> None:
    q, k, v = _inputs(2, 2, 16, 16, 8)
    sep = torch.tensor([4, 9])
    plain = attention(q, k, v, sep, backend=backend)
    evaluated = attention(q, k, v, sep, backend=backend, dropout_p=0.5, training=False)
    torch.testing.assert_close(evaluated, plain)
    torch.manual_seed(0)
    dropped = attention(q, k, v, sep, backend=backend, dropout_p=0.5, training=True)
    torch.manual_seed(0)
    again = attention(q, k, v, sep, backend=backend, dropout_p=0.5, training=True)
    assert not torch.allclose(dropped, plain)
    torch.testing.assert_close(dropped, again)


def test_bad_inputs_raise_value_errors_with_values() -> None:
    q, k, v = _inputs(2, 2, 4, 6, 8)
    sep = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"q must be 4-D.*\(4, 8\)"):
        attention(q[0, 0], k, v, sep)
    with pytest.raises(ValueError, match="k and v shapes differ"):
        attention(q, k, v[:, :, :5], sep)
    with pytest.raises(ValueError, match="disagree"):
        attention(q, k[:, :1], v[:, :1], sep)
    with pytest.raises(ValueError, match="more queries than keys"):
        attention(k, q, q, sep)
    with pytest.raises(ValueError, match="floating point"):
        attention(q.long(), k, v, sep)
    with pytest.raises(ValueError, match="dtypes differ"):
        attention(q.double(), k, v, sep)
    with pytest.raises(ValueError, match=r"\[0, 6\].*max 7"):
        attention(q, k, v, torch.tensor([1, 7]))
    with pytest.raises(ValueError, match="min -1"):
        attention(q, k, v, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match=r"shape \[2\].*\(3,\)"):
        attention(q, k, v, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="integer tensor"):
        attention(q, k, v, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, k, v, sep, backend="flash")
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, k, v, sep, dropout_p=1.0)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("sq,sk,sep", CASES)
def test_fused_matches_dense_forward_and_backward_fp32(
    sq: int, sk: int, sep: list[int], recompute: bool
) -> None:
    q, k, v = _inputs(2, 3, sq, sk, 16, seed=4)
    sep_t = torch.tensor(sep)
    outs, grads = [], []
    for backend in ("dense", "fused"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, sep_t, backend=backend, training=True, recompute=recompute)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in leaves])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _fused_with_dropout(
    leaves: list[torch.Tensor], sep: torch.Tensor, p: float, recompute: bool, seed: int
) -> torch.Tensor:
    torch.manual_seed(seed)
    return attention(*leaves, sep, backend="fused", dropout_p=p, training=True, recompute=recompute)


@pytest.mark.parametrize("recompute", [False, True])
def test_fused_dropout_is_the_formula_with_its_mask(recompute: bool) -> None:
    """float64: the fused output and gradients equal autograd of softmax -> mask * scale -> @ v
    with the mask the generator gives for the same seed, so the fused backward is right."""
    from megatron_glm.kernels.dropout import keep_bits

    q, k, v = (t.double() for t in _inputs(2, 3, 12, 12, 8, seed=5))
    sep, p, seed = torch.tensor([4, 12]), 0.3, 11
    weights = torch.linspace(-1, 1, q.numel(), dtype=q.dtype).view_as(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = _fused_with_dropout(leaves, sep, p, recompute, seed)
    state = torch.get_rng_state()
    (out * weights).sum().backward()
    assert torch.equal(state, torch.get_rng_state())  # backward replays, never draws

    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    rq, rk, rv = ref_leaves
    scores = rq @ (rk / math.sqrt(8)).transpose(-1, -2)
    scores = scores.masked_fill(~allowed_mask(sep, 12, 12), -65504.0)
    torch.manual_seed(seed)
    bits, scale = keep_bits(scores.shape, p, scores.dtype)
    assert 0 < (bits == 0).sum() < bits.numel()
    ref = (torch.softmax(scores, -1) * (bits != 0) * scale) @ rv
    (ref * weights).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_elements", [None, 32 * 32, 1])  # 4 heads, 1 head, 1 head a chunk
def test_fused_recompute_changes_nothing_but_memory_bf16(
    monkeypatch: pytest.MonkeyPatch, chunk_elements: int | None
) -> None:
    """Recomputation makes the scores a chunk of heads at a time; output and gradients equal the
    whole-tensor path's bit for bit (the chunks draw the same dropout bits in the same order)."""
    if chunk_elements is not None:
        monkeypatch.setattr(attention_module, "_SCORE_CHUNK_ELEMENTS", chunk_elements)
    q, k, v = _inputs(2, 4, 32, 32, 16, dtype=torch.bfloat16, seed=6)
    sep = torch.tensor([9, 20])
    results = []
    for recompute in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = _fused_with_dropout(leaves, sep, 0.1, recompute, seed=2)
        out.float().sum().backward()
        results.append([out, *(t.grad for t in leaves)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_in_place_softmax_equals_torch_softmax() -> None:
    # the fused backend normalises the scores in place through torch._softmax(out=input)
    for dtype in (torch.float32, torch.bfloat16):
        x = (5 * torch.randn(2, 3, 17, 65)).to(dtype)
        expected = torch.softmax(x, -1)
        torch._softmax(x, -1, False, out=x)
        assert torch.equal(x, expected)


def test_auto_takes_fused_for_16_bit_inputs_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEGATRON_GLM_16BIT_GEMM", "native")  # a CPU with bf16 products
    sep = torch.tensor([3, 7])
    mask = prepare_attention_mask(sep, 8, 8, "auto")
    assert mask.backend == "sdpa" and mask.auto
    for dtype, backend in ((torch.bfloat16, "fused"), (torch.float32, "sdpa")):
        q, k, v = _inputs(2, 2, 8, 8, 16, dtype=dtype, seed=7)
        with torch.no_grad():
            got = attention(q, k, v, sep, mask=mask)
            want = attention(q, k, v, sep, backend=backend)
        assert torch.equal(got, want), dtype


def test_auto_takes_fp32_sdpa_for_16_bit_inputs_where_products_run_in_fp32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without bf16 products (no AVX512) 16-bit inputs without dropout take SDPA on fp32 copies:
    output and gradients are the fp32 SDPA's, rounded once."""
    monkeypatch.setenv("MEGATRON_GLM_16BIT_GEMM", "fp32")
    sep = torch.tensor([3, 7])
    mask = prepare_attention_mask(sep, 8, 8, "auto")
    q, k, v = _inputs(2, 2, 8, 8, 16, dtype=torch.bfloat16, seed=10)
    grad = _inputs(2, 2, 8, 8, 16, dtype=torch.bfloat16, seed=11)[0]
    results = []
    for dtype, backend in ((torch.bfloat16, "auto"), (torch.float32, "sdpa")):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, sep, backend=backend, mask=mask if backend == "auto" else None)
        out.backward(grad.to(dtype))
        results.append([out.detach(), *(t.grad for t in leaves)])
    for got, want in zip(*results):
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, want.bfloat16())
