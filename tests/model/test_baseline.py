"""The benchmark baseline (benchmarks/baseline.py, the official code's eager step) computes the same
function as GLMModel: same logits, loss and gradients in fp32 without dropout, so run_all.py's
ratios compare two implementations of one model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.baseline import Baseline, ProductsInFp32, baseline_loss
from megatron_glm import GLMConfig, GLMModel
from megatron_glm.kernels import matmul as mm
from megatron_glm.model import glm_loss
from tests.model.test_glm import batch


def test_baseline_equals_model_fp32_without_dropout() -> None:
    config = GLMConfig.from_preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
    model = GLMModel(config).train()
    with torch.no_grad():  # perturb biases and LayerNorms so a misplaced one shows
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    baseline = Baseline(config).train()
    baseline.load_state_dict(model.state_dict(), strict=True)
    ids, pos, sep = batch(config, b=2, s=12, seps=(5, 8))
    labels = torch.roll(ids, -1, dims=1)
    loss_mask = (torch.arange(12) >= sep.view(-1, 1)).float()

    logits = model(ids, pos, sep)
    ours = glm_loss(logits, labels, loss_mask, None, loss_mask.sum())
    ours.backward()
    theirs_logits = baseline(ids, pos, sep)
    theirs = baseline_loss(theirs_logits, labels, loss_mask)
    theirs.backward()

    torch.testing.assert_close(logits, theirs_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    grads = dict(baseline.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_products_in_fp32_route_the_baselines_bf16_products(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under ProductsInFp32 the baseline's bf16 step makes its products through
    megatron_glm.kernels.matmul (counted) and keeps torch's values within bf16 rounding."""
    config = GLMConfig.from_preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
    baseline = Baseline(config).to(torch.bfloat16)
    ids, pos, sep = batch(config, b=2, s=12, seps=(5, 8))
    monkeypatch.setenv(mm.ENV_VAR, "native")
    plain = baseline(ids, pos, sep)
    monkeypatch.setenv(mm.ENV_VAR, "fp32")
    calls: list[str] = []
    for name, function in (("matmul", mm._Fp32ComputeMatmul), ("linear", mm._Fp32ComputeLinear)):
        forward = function.forward

        def counted(*a, name=name, forward=forward):
            calls.append(name)
            return forward(*a)

        monkeypatch.setattr(function, "forward", staticmethod(counted))
    with ProductsInFp32():
        routed = baseline(ids, pos, sep)
    layers = config.num_layers
    assert calls.count("linear") == 4 * layers + 1  # qkv, dense, h->4h, 4h->h; the LM head
    assert calls.count("matmul") == 2 * layers  # scores and context
    assert routed.dtype == torch.bfloat16
    cos = F.cosine_similarity(routed.float().flatten(), plain.float().flatten(), dim=0).item()
    assert cos > 0.999, cos
