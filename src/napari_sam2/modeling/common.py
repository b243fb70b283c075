"""Small building blocks shared by several SAM2 components."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .attention import bf16_cpu_inference
from .linear import Linear, linear_activation


class MLP(nn.Module):
    """A stack of ``num_layers`` linear layers with an activation between them.

    Used for the IoU, object-score and hypernetwork heads, the object pointer projection and
    the Hiera blocks' feed-forward part (state-dict keys ``layers.<i>.weight``).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        activation: type[nn.Module] = nn.ReLU,
        sigmoid_output: bool = False,
    ):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(Linear(i, o) for i, o in zip(dims_in, dims_out))
        self.act = activation()
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = linear_activation(x, layer, self.act) if i < last else layer(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


# below this many channels torch's layer norm is the slower one: 4 x 4 x 512^2 in bf16 took 37 ms against the
# formula's 9 ms (16 channels: 11 ms against 25 ms; 2 cores)
FUSED_NORM_MIN_CHANNELS = 16


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a B x C x H x W tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bf16_cpu_inference(x, self.weight) and x.shape[1] >= FUSED_NORM_MIN_CHANNELS:
            # bf16 inference on a CPU (the memory encoder; measured there only): torch's layer norm over
            # the channels of a channels-last view, accumulating in fp32, instead of nine passes each
            # rounded to bf16; the result keeps channels-last strides, which the next convolution reads
            # without reordering
            y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
            return y.permute(0, 3, 1, 2)  # B x C x H x W, channels-last strides
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def needs_cpu_resize(device_type: str, torch_version: str, mode: str, antialias: bool) -> bool:
    """MPS implements bicubic and antialiased bilinear resizing from torch 2.7 on only."""
    if device_type != "mps" or not (mode == "bicubic" or antialias):
        return False
    major, minor = (int(v) for v in re.match(r"(\d+)\.(\d+)", torch_version).groups())
    return (major, minor) < (2, 7)


def interpolate(x: torch.Tensor, size, mode: str, antialias: bool = False, **kwargs) -> torch.Tensor:
    """``F.interpolate``, on the CPU where the tensor's device lacks the mode (then moved back)."""
    if needs_cpu_resize(x.device.type, torch.__version__, mode, antialias):
        return F.interpolate(x.cpu(), size=size, mode=mode, antialias=antialias, **kwargs).to(x.device)
    return F.interpolate(x, size=size, mode=mode, antialias=antialias, **kwargs)


def resize_masks(masks: torch.Tensor, size: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """Bilinear resize of B x C x H x W mask logits (half-pixel centres, as SAM does)."""
    return interpolate(masks, size=size, mode="bilinear", align_corners=False, antialias=antialias)
