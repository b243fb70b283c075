"""The attention every layer calls: torch's kernel for fp32 and training (the reference's numbers), and
for bf16 inference on CPUs without AMX the same attention as two matrix products (torch's CPU flash
kernel gains nothing from bf16 there)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_sam2.modeling import attention as attention_mod
from napari_sam2.modeling.attention import attention, matmul_attention

SHAPES = {
    # Hiera's windowed blocks: many windows of 64 tokens, 2 heads
    "windows": ((64, 2, 64, 32), (64, 2, 64, 32)),
    # memory attention: one query set shared by a batch of 3 objects' memories, keys >> queries
    "memory, shared queries": ((1, 1, 256, 64), (3, 1, 1100, 64)),
    # global attention with 4 heads
    "global": ((1, 4, 300, 48), (1, 4, 300, 48)),
}


def _qkv(name, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qs, ks = SHAPES[name]
    # scaled so that the softmax is far from uniform: a wrong scale or key order would show
    q = (torch.randn(qs, generator=g) * 3).to(dtype)
    k = torch.randn(ks, generator=g).to(dtype)
    v = torch.randn(ks, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("block_bytes, query_chunk", [(attention_mod.SCORE_BLOCK_BYTES, 512), (20_000, 512), (1, 100)])
def test_the_matmul_attention_is_the_attention(name, block_bytes, query_chunk, monkeypatch):
    """In fp32 it gives torch's result to rounding, whether the scores fit in one block, are split
    into groups of windows or into chunks of queries with a shorter last one (small sizes force
    every split)."""
    monkeypatch.setattr(attention_mod, "SCORE_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(attention_mod, "QUERY_CHUNK", query_chunk)
    q, k, v = _qkv(name)
    expected = F.scaled_dot_product_attention(q.expand(k.shape[0], -1, -1, -1), k, v)
    got = matmul_attention(q, k, v)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_bf16_matmul_attention_is_as_close_to_fp32_as_torchs_bf16_kernel(name):
    q, k, v = _qkv(name)
    exact = F.scaled_dot_product_attention(q.expand(k.shape[0], -1, -1, -1), k, v)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    ours = (matmul_attention(qb, kb, vb).float() - exact).abs()
    torchs = (F.scaled_dot_product_attention(qb.expand(kb.shape[0], -1, -1, -1), kb, vb).float() - exact).abs()
    # the scores are rounded to bf16 before the softmax: a few times torch's error, never more
    assert ours.max() <= 4 * torchs.max() + 1e-3
    assert ours.mean() <= 4 * torchs.mean() + 1e-4


def _path_taken(monkeypatch, q, k, v, **kw):
    taken = []
    real = attention_mod.matmul_attention
    monkeypatch.setattr(attention_mod, "matmul_attention", lambda *a: taken.append("matmul") or real(*a))
    out = attention(q, k, v, **kw)
    return ("matmul" if taken else "torch"), out


@pytest.mark.parametrize(
    "features, expected",
    [([], "torch"), (["avx512_bf16"], "matmul"), (["amx_bf16", "avx512_bf16"], "torch")],
)
def test_bf16_inference_takes_the_matmul_path_only_with_avx512_bf16_and_no_amx(features, expected, monkeypatch):
    monkeypatch.setattr("napari_sam2.precision.cpu_bf16_features", lambda: features)
    attention_mod._matmul_path_pays.cache_clear()
    try:
        q, k, v = _qkv("global", torch.bfloat16)
        with torch.inference_mode():
            path, _ = _path_taken(monkeypatch, q, k, v)
            assert path == expected
            # empty queries or keys: torch's kernel, whatever the CPU
            assert _path_taken(monkeypatch, q[..., :0, :], k, v)[0] == "torch"
    finally:
        attention_mod._matmul_path_pays.cache_clear()


def test_fp32_training_and_dropout_always_take_torchs_kernel(monkeypatch):
    monkeypatch.setattr(attention_mod, "_matmul_path_pays", lambda: True)
    q, k, v = _qkv("global")
    with torch.inference_mode():
        path, out = _path_taken(monkeypatch, q, k, v)
    assert path == "torch"
    # fp32 results are torch's own, bit for bit: the parity tests against the reference rely on it
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    path, out = _path_taken(monkeypatch, qb, kb, vb)  # grad enabled: training keeps torch's kernel
    assert path == "torch"
    out.sum().backward()
    assert qb.grad is not None
    with torch.no_grad():
        path, _ = _path_taken(monkeypatch, qb, kb, vb, dropout_p=0.1)
    assert path == "torch"
