"""The KV cache and the key mask: a cached, incremental forward equals the plain forward."""

from __future__ import annotations

import pytest
import torch

from megatron_glm.inference import KVCache
from megatron_glm.kernels import attention, prepare_attention_mask
from megatron_glm.model import GLMModel
from tests.inference.conftest import tiny_config


@pytest.mark.parametrize("backend", ["dense", "sdpa", "flex"])
def test_cached_forward_equals_plain_forward(backend: str) -> None:
    torch.manual_seed(0)
    model = GLMModel(tiny_config(attention_backend=backend)).eval()
    b, s, first = 3, 28, 20
    ids = torch.randint(0, 1000, (b, s))
    sep = torch.tensor([7, 12, first])  # the first forward holds every row's Part A
    positions = torch.stack([torch.arange(s).expand(b, s), torch.zeros(b, s, dtype=torch.long)], 1)
    positions[0, :, 7:] = torch.tensor([[3] * 21, list(range(1, 22))])  # a Part B after sep 7
    with torch.no_grad():
        expected = model(ids, positions, sep)  # [b, s, v]
        cache = KVCache(model.config.num_layers, initial_capacity=4)  # grows
        pieces = [model(ids[:, :first], positions[..., :first], sep, cache)]
        for i in range(first, s):  # one token at a time, as decoding does
            pieces.append(model(ids[:, i : i + 1], positions[..., i : i + 1], sep, cache))
    assert cache.length == s
    torch.testing.assert_close(torch.cat(pieces, 1), expected, rtol=0, atol=2e-5)


def _compact_reference(q, k, v, sep, key_mask):
    """Attention of each row over its unmasked keys only (padding removed, sep recounted)."""
    out = []
    sq, sk = q.shape[2], k.shape[2]
    for row in range(q.shape[0]):
        keep = key_mask[row].nonzero().squeeze(1)
        query_keys = torch.arange(sk - sq, sk)  # the key position of each query
        # a query sees the kept keys that are in Part A or not after it
        allowed = (keep[None, :] < sep[row]) | (keep[None, :] <= query_keys[:, None])
        scores = q[row] @ k[row][:, keep].transpose(-1, -2) / k.shape[-1] ** 0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        out.append(torch.softmax(scores, -1) @ v[row][:, keep])
    return torch.stack(out)


@pytest.mark.parametrize("backend", ["dense", "sdpa", "flex"])
def test_key_mask_equals_removing_the_padding(backend: str) -> None:
    torch.manual_seed(1)
    b, n, sq, sk, d = 2, 2, 3, 9, 8
    q, k, v = (torch.randn(b, n, length, d) for length in (sq, sk, sk))
    sep = torch.tensor([4, 2])
    key_mask = torch.ones(b, sk, dtype=torch.bool)
    key_mask[0, 4:6] = False  # padding between Part A and Part B
    key_mask[1, [2, 5]] = False
    mask = prepare_attention_mask(sep, sq, sk, backend, key_mask=key_mask)
    got = attention(q, k, v, sep, mask=mask)
    torch.testing.assert_close(got, _compact_reference(q, k, v, sep, key_mask))


def test_key_mask_must_match_the_keys() -> None:
    with pytest.raises(ValueError, match=r"key_mask must be a bool tensor of shape \[2, 5\]"):
        prepare_attention_mask(torch.tensor([1, 2]), 1, 5, "sdpa", key_mask=torch.ones(2, 4) > 0)


def test_cache_rows_and_truncation() -> None:
    cache = KVCache(num_layers=1, initial_capacity=2)
    layer = cache.layer(0)
    keys = torch.arange(2 * 3, dtype=torch.float).view(2, 1, 3, 1)  # rows 0 and 1, 3 tokens
    cache.mask_with(torch.tensor([[True, False, True], [True, True, True]]))
    k, v = layer.update(keys, -keys)
    cache.advance(3)
    assert k.shape == (2, 1, 3, 1) and torch.equal(v, -keys)
    cache.select_rows(torch.tensor([1, 1, 0]))
    assert cache.key_mask.tolist() == [[True] * 3, [True] * 3, [True, False, True]]
    cache.truncate(1)
    k, _ = layer.update(torch.full((3, 1, 1, 1), 9.0), torch.zeros(3, 1, 1, 1))
    assert k[:, 0, :, 0].tolist() == [[3.0, 9.0], [3.0, 9.0], [0.0, 9.0]]
    with pytest.raises(ValueError, match="cannot truncate a cache of 1 tokens to 2"):
        cache.truncate(2)
