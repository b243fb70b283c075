"""``nn.Linear`` whose bf16 inference on a CPU adds the bias inside oneDNN's matrix product.

torch's CPU ``addmm`` first copies the bias into every row of the output and then accumulates the
product onto it: one more pass over outputs of up to 72 MiB (Hiera's first stage: 65536 tokens x 576).
oneDNN's fused bias gives the same bits (``tests/test_bf16_kernels.py``; measured equal on every shape of the
image encoder, memory attention and memory encoder) in 3-30 % less time on 2 cores with AVX-512 BF16
(65536 x 96 -> 384: 20.8 ms -> 14.6 ms; 16384 x 256 -> 2048: 58.9 ms -> 51.0 ms). Only on the CPUs
where that was measured (those of the bf16 matrix-product attention), only without a graph being built,
and only for contiguous inputs (a strided input takes another path in torch, with other bits): fp32
and training stay torch's own ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import attention


def fuses_bias(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :class:`Linear` computes ``x W^T + b`` with oneDNN's fused bias."""
    return (
        bias is not None and attention.spelled_out_bf16_inference(x, weight, bias) and x.is_contiguous()
        and x.numel() > 0 and not torch.compiler.is_compiling()
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, with the fused bias where :func:`fuses_bias` says."""
    if fuses_bias(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state-dict keys and LoRA adaptation) with the fused bias above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def pointwise_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1 x 1 convolution of B x C x H x W ``x`` (cast to the convolution's dtype).

    In bf16 inference on a CPU it is a bf16 product over the channels of ``x``'s channels-last view
    (the Hiera trunk's maps are channels-last), with fp32 weights cast to bf16: the decoder's
    projections of the high-resolution levels, whose output is kept in bf16 anyway, otherwise copy the
    64 MiB level to fp32 and convolve there (65536 x 256 -> 32: 21 ms + 41 ms against 6.6 ms; 2 cores).
    The result keeps channels-last strides.
    """
    if not attention.bf16_cpu_inference(x):
        return conv(x.to(conv.weight.dtype))
    weight = conv.weight.flatten(1).to(x.dtype)  # Cout x Cin
    bias = None if conv.bias is None else conv.bias.to(x.dtype)
    return linear(x.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)  # B x Cout x H x W
