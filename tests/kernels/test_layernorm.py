"""The LayerNorm factory: torch's LayerNorm without apex, apex's class when apex and CUDA exist."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from megatron_glm.kernels import apex_layer_norm_class, make_layer_norm


def test_without_apex_uses_torch_layernorm(monkeypatch: pytest.MonkeyPatch) -> None:
    # Make sure "apex" cannot import even if it is installed here.
    monkeypatch.setitem(sys.modules, "apex", None)
    monkeypatch.setitem(sys.modules, "apex.normalization", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert apex_layer_norm_class() is None
    norm = make_layer_norm(16, 1e-5)
    assert type(norm) is torch.nn.LayerNorm
    assert [name for name, _ in norm.named_parameters()] == ["weight", "bias"]
    assert torch.equal(norm.weight, torch.ones(16)) and torch.equal(norm.bias, torch.zeros(16))
    x = torch.randn(3, 16)
    torch.testing.assert_close(norm(x), F.layer_norm(x, (16,), eps=1e-5))


def test_uses_apex_when_it_imports_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeFusedLayerNorm(torch.nn.LayerNorm):
        pass

    apex = types.ModuleType("apex")
    normalization = types.ModuleType("apex.normalization")
    normalization.FusedLayerNorm = FakeFusedLayerNorm  # type: ignore[attr-defined]
    apex.normalization = normalization  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.normalization", normalization)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert type(make_layer_norm(8)) is torch.nn.LayerNorm  # no CUDA: apex is not used
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    norm = make_layer_norm(8, 1e-5)
    assert type(norm) is FakeFusedLayerNorm and norm.eps == 1e-5
    assert type(make_layer_norm(8, prefer_apex=False)) is torch.nn.LayerNorm


def test_bad_sizes() -> None:
    with pytest.raises(ValueError, match="hidden_size \\(0\\)"):
        make_layer_norm(0)
