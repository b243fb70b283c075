"""Scaled dot-product attention, with a bf16 path for CPUs whose flash kernel gains nothing from bf16.

torch's CPU flash attention computes bf16 fast only with AMX tiles. On a CPU with AVX-512 BF16 but no
AMX it ran no faster than fp32 (memory attention's 4096 queries x 28.7k keys x 256: 0.81 s bf16 vs
0.82 s fp32, 2 threads), while bf16 matrix products there are 2.3x fp32. Spelled out as two matrix
products around a softmax, 512 queries at a time to keep the score block in cache, the same attention
took 0.43 s; Hiera's global attention (4 heads x 4096 x 4096 x 96) 0.12 s instead of 0.21 s. Only
attention that builds no graph goes that way (inference, and a frozen encoder in fine-tuning). The
scores are rounded to bf16 before the softmax (flash keeps them in fp32): errors about 1.5-2x
flash's, well inside the bf16 accuracy criterion (``tests/test_bf16_accuracy.py``). fp32 always goes
to torch's kernel, so fp32 results stay the reference's.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

# queries per block when one query set's scores would not fit a block: 512 queries of 16k-28.7k keys
# was the fastest chunk measured (128-768 tried) on a 2-core AVX-512 BF16 CPU
QUERY_CHUNK = 512
# small attentions (Hiera's windows) run as batched products over groups of at most this many score bytes
SCORE_BLOCK_BYTES = 24 << 20


@functools.cache
def bf16_products_spelled_out() -> bool:
    """AVX-512 BF16 without AMX: the CPUs where bf16 matrix products beat torch's bf16 flash kernel
    (measured; elsewhere that kernel is either fast (AMX) or bf16 itself is emulated)."""
    from ..precision import cpu_bf16_features

    features = cpu_bf16_features()
    return "avx512_bf16" in features and "amx_bf16" not in features


@functools.cache
def fast_bf16_cpu() -> bool:
    """A CPU that computes bf16 products natively (AMX or AVX-512 BF16): what ``precision="auto"`` reads."""
    from ..precision import fast_bf16

    return fast_bf16(torch.device("cpu"))[0]


def bf16_cpu_inference(*tensors: torch.Tensor) -> bool:
    """bf16 ``tensors`` on a CPU with no graph being built (inference, or a frozen part in fine-tuning)."""
    return (
        all(t.dtype == torch.bfloat16 for t in tensors) and tensors[0].device.type == "cpu"
        and not torch.is_grad_enabled()
    )


def spelled_out_bf16_inference(*tensors: torch.Tensor) -> bool:
    """:func:`bf16_cpu_inference` on such a CPU: where bf16 products are spelled out (this attention,
    memory attention's late value projection and the linear layers' fused bias in ``linear.py``); a
    training step's attention always takes torch's kernel."""
    return bf16_cpu_inference(*tensors) and bf16_products_spelled_out()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for ... x Lq x d queries, ... x Lk x d keys, ... x Lk x dv values
    (leading dimensions broadcast, as in ``F.scaled_dot_product_attention``)."""
    if dropout_p == 0.0 and spelled_out_bf16_inference(q, k, v) and q.numel() and k.numel() and v.numel():
        return matmul_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The attention as ``softmax((q / sqrt(d)) @ k^T) @ v`` for non-empty queries and keys, in blocks
    of :data:`QUERY_CHUNK` queries or batched groups of at most :data:`SCORE_BLOCK_BYTES` of scores
    (any dtype; :func:`attention` sends only CPU bf16 here)."""
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    lq, lk = q.shape[-2], k.shape[-2]
    q = q * q.shape[-1] ** -0.5
    itemsize = q.element_size()
    rows = math.prod(lead)
    q = q.expand(*lead, lq, q.shape[-1]).reshape(rows, lq, -1)  # R x Lq x d
    k = k.expand(*lead, lk, k.shape[-1]).reshape(rows, lk, -1)  # R x Lk x d
    v = v.expand(*lead, lk, v.shape[-1]).reshape(rows, lk, -1)  # R x Lk x dv
    out = q.new_empty(rows, lq, v.shape[-1])
    # one buffer for every block of a call, the softmax written over the scores it reads (the same bits,
    # half the memory and 1-4 % faster than a second buffer): a fresh 29 MiB block per product costs page
    # faults (measured 15 % of the attention's time) and varies with the allocator's state
    per_row = lq * lk * itemsize
    if per_row <= SCORE_BLOCK_BYTES:
        # many small windows (Hiera's windowed blocks): batched products over groups of windows
        group = min(rows, SCORE_BLOCK_BYTES // per_row)
        scores = q.new_empty(group, lq, lk)
        for r in range(0, rows, group):
            n = min(group, rows - r)
            torch.matmul(q[r : r + n], k[r : r + n].transpose(1, 2), out=scores[:n])  # G x Lq x Lk
            torch.softmax(scores[:n], dim=-1, out=scores[:n])
            torch.matmul(scores[:n], v[r : r + n], out=out[r : r + n])
        return out.reshape(*lead, lq, -1)
    scores = q.new_empty(min(QUERY_CHUNK, lq), lk)
    for r in range(rows):
        # a contiguous k^T: the product reads it row-major (1.8x faster than through a transposed view)
        kt = k[r].t().contiguous()  # d x Lk
        for i in range(0, lq, QUERY_CHUNK):
            n = min(QUERY_CHUNK, lq - i)
            torch.matmul(q[r, i : i + n], kt, out=scores[:n])  # chunk x Lk
            torch.softmax(scores[:n], dim=-1, out=scores[:n])
            torch.matmul(scores[:n], v[r], out=out[r, i : i + n])
    return out.reshape(*lead, lq, -1)
