"""``nn.Linear`` whose bf16 inference on a CPU adds the bias inside oneDNN's matrix product.

torch's CPU ``addmm`` first copies the bias into every row of the output and then accumulates the
product onto it: one more pass over outputs of up to 72 MiB (Hiera's first stage: 65536 tokens x 576).
oneDNN's fused bias gives the same bits (``tests/test_bf16_kernels.py``; measured equal on every shape of the
image encoder, memory attention and memory encoder) in 3-30 % less time on 2 cores with AVX-512 BF16
(65536 x 96 -> 384: 20.8 ms -> 14.6 ms; 16384 x 256 -> 2048: 58.9 ms -> 51.0 ms). Only on the CPUs
where that was measured (those of the bf16 matrix-product attention), only without a graph being built,
and only for contiguous inputs (a strided input takes another path in torch, with other bits): fp32
and training stay torch's own ``F.linear``. On any fast-bf16 CPU (AMX too), a linear layer followed by
a ReLU or GELU is one oneDNN product with the activation applied before rounding
(:func:`linear_activation`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import attention


def onednn_inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """bf16 inference on a CPU with a bias, a contiguous non-empty input (a strided one takes another
    path in torch, with other bits), no graph being compiled and oneDNN switched on: where oneDNN's
    product may be called itself (which CPUs it pays on is for the caller to say)."""
    return (
        bias is not None and attention.bf16_cpu_inference(x, weight, bias) and x.is_contiguous()
        and x.numel() > 0 and not torch.compiler.is_compiling()
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    )


def fuses_bias(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :class:`Linear` computes ``x W^T + b`` with oneDNN's fused bias: only where bf16 products
    are spelled out (with AMX it measured 0.85-1.3x torch's ``addmm`` by shape, no clear gain)."""
    return onednn_inference(x, weight, bias) and attention.bf16_products_spelled_out()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, with the fused bias where :func:`fuses_bias` says."""
    if fuses_bias(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def onednn_post_op(activation: nn.Module) -> tuple[str, str] | None:
    """oneDNN's name and algorithm for an activation it can apply inside a product, or None."""
    if isinstance(activation, nn.ReLU):
        return "relu", ""
    if isinstance(activation, nn.GELU) and activation.approximate == "none":
        return "gelu", "none"
    return None


def linear_activation(x: torch.Tensor, layer: nn.Module, activation: nn.Module) -> torch.Tensor:
    """``activation(layer(x))``.

    In bf16 inference on a fast-bf16 CPU, with a plain linear ``layer`` and a ReLU or exact GELU, it is
    one oneDNN product that applies the activation to its fp32 result before rounding instead of a
    second pass over the output: on AMX (2 cores) a bf16 ReLU over memory attention's 4 x 4096 x 2048
    hidden layer alone took 17 ms against 8 ms for the whole product (torch's elementwise bf16 kernels
    slow down on outputs of more than a few MiB per core). ReLU keeps the bits of finite values
    (rounding keeps signs and zero; oneDNN's ReLU turns NaN into 0, where torch's keeps it); GELU of
    the unrounded result is closer to fp32 than GELU of the rounded one. Anything else (fp32,
    training, a LoRA-adapted layer) is the layer followed by the activation module.
    """
    post_op = onednn_post_op(activation)
    if (
        post_op is not None and isinstance(layer, nn.Linear) and onednn_inference(x, layer.weight, layer.bias)
        and attention.fast_bf16_cpu()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, post_op[0], [], post_op[1])
    return activation(layer(x))


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
