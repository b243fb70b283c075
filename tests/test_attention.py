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
    attention_mod.bf16_products_spelled_out.cache_clear()
    try:
        q, k, v = _qkv("global", torch.bfloat16)
        with torch.inference_mode():
            path, _ = _path_taken(monkeypatch, q, k, v)
            assert path == expected
            # empty queries or keys: torch's kernel, whatever the CPU
            assert _path_taken(monkeypatch, q[..., :0, :], k, v)[0] == "torch"
    finally:
        attention_mod.bf16_products_spelled_out.cache_clear()


def test_fp32_training_and_dropout_always_take_torchs_kernel(monkeypatch):
    monkeypatch.setattr(attention_mod, "bf16_products_spelled_out", lambda: True)
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


def _memory_cross_attention(seed=0):
    """Memory attention's cross-attention (one head, 64-wide memories under a 256-wide head) with 1 query
    set against 2 objects' memories: 16 spatial tokens per frame x 3 frames + 4 pointer tokens."""
    from napari_sam2.modeling.transformer import RoPEAttention

    torch.manual_seed(seed)
    layer = RoPEAttention(256, num_heads=1, rope_k_repeat=True, kv_in_dim=64, feat_sizes=(4, 4)).eval()
    with torch.no_grad():
        layer.v_proj.bias.normal_()  # a bias the late projection must add exactly once
    x = torch.randn(1, 16, 256) * 3
    memory = torch.randn(2, 52, 64)
    keys = memory + torch.randn(2, 52, 64)
    return layer, x, keys, memory


def test_memory_cross_attention_projects_the_attended_memories_on_the_bf16_matmul_path(monkeypatch):
    """softmax(qk) (m W + b) = (softmax(qk) m) W + b: the product with the probabilities runs 64 wide
    instead of 256; the result is the same attention (fp32 to rounding; bf16 as close to fp32 as the
    usual order)."""
    from napari_sam2.modeling import transformer

    layer, x, keys, memory = _memory_cross_attention()
    with torch.inference_mode():
        exact = layer(x, keys, memory, num_k_exclude_rope=4)
        # the algebra, in fp32: the late projection forced on torch's kernel (which takes 64-wide values)
        monkeypatch.setattr(transformer.RoPEAttention, "_projects_values_late", lambda self, q, k, v: True)
        late_fp32 = layer(x, keys, memory, num_k_exclude_rope=4)
        torch.testing.assert_close(late_fp32, exact, rtol=0, atol=1e-5)
        monkeypatch.undo()

        # the path itself: bf16 inference on a CPU where the matmul attention pays, and nowhere else
        monkeypatch.setattr(attention_mod, "bf16_products_spelled_out", lambda: True)
        seen = []
        hooks = [getattr(layer, name).register_forward_pre_hook(lambda m, a, name=name: seen.append((name, tuple(a[0].shape))))
                 for name in ("k_proj", "v_proj")]
        layer.bfloat16()
        xb, kb, mb = x.bfloat16(), keys.bfloat16(), memory.bfloat16()
        late_bf16 = layer(xb, kb, mb, num_k_exclude_rope=4).float()
        for hook in hooks:
            hook.remove()
        # the value projection read the attended memories (2 objects x 16 queries), not the 52 memory tokens
        assert seen == [("k_proj", (2, 52, 64)), ("v_proj", (2, 1, 16, 64))]
        monkeypatch.setattr(transformer.RoPEAttention, "_projects_values_late", lambda self, q, k, v: False)
        early_bf16 = layer(xb, kb, mb, num_k_exclude_rope=4).float()
    scale = exact.abs().max()
    late_err, early_err = (late_bf16 - exact).abs().max(), (early_bf16 - exact).abs().max()
    assert late_err <= 2 * early_err + 1e-2 * scale, (late_err, early_err, scale)
    assert late_err <= 5e-2 * scale


def test_fp32_and_training_keep_the_reference_order_of_the_value_projection(monkeypatch):
    monkeypatch.setattr(attention_mod, "bf16_products_spelled_out", lambda: True)
    layer, x, keys, memory = _memory_cross_attention()
    calls = []
    real = layer.v_proj.forward
    monkeypatch.setattr(layer.v_proj, "forward", lambda inp: calls.append(tuple(inp.shape)) or real(inp))
    with torch.inference_mode():
        layer(x, keys, memory, num_k_exclude_rope=4)  # fp32: values projected first, as the reference
    layer.bfloat16().train()
    layer(x.bfloat16(), keys.bfloat16(), memory.bfloat16(), num_k_exclude_rope=4)  # a training step
    with torch.no_grad():  # training mode without a graph (attention dropout on): still the reference's order
        layer(x.bfloat16(), keys.bfloat16(), memory.bfloat16(), num_k_exclude_rope=4)
    assert calls == [(2, 52, 64)] * 3
