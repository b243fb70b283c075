"""bf16 inference kernels: the linear layers' fused bias (the same bits as torch's ``F.linear``, only where
it is meant to run), the memory encoder's channel layer norm (closer to fp32 than nine bf16 passes), the
decoder's pointwise projections in bf16, the image encoder's contiguous first stage, RoPE written in place and
the feed-forward layers' activations inside the product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_sam2.modeling import attention as attention_mod
from napari_sam2.modeling import linear as linear_mod
from napari_sam2.modeling.common import LayerNorm2d
from napari_sam2.modeling.linear import Linear, fuses_bias, linear_activation, pointwise_conv
from napari_sam2.modeling.position_encoding import apply_rope, axial_rope_angles

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

# (input shape, in, out): Hiera's first stage and a window batch, memory attention's feed-forward
# layer and the memory encoder's pointwise convolution
SHAPES = [((1, 64, 64, 96), 96, 576), ((256, 8, 8, 96), 96, 384), ((2, 1024, 256), 256, 2048), ((2, 16, 16, 256), 256, 1024)]


@pytest.fixture
def spelled_out(monkeypatch):
    """Pretend this CPU is one where bf16 products are spelled out (AVX-512 BF16 without AMX)."""
    monkeypatch.setattr(attention_mod, "bf16_products_spelled_out", lambda: True)


def _layer(n_in: int, n_out: int, dtype=torch.bfloat16) -> Linear:
    torch.manual_seed(n_in * 7 + n_out)
    layer = Linear(n_in, n_out).to(dtype)
    with torch.no_grad():
        layer.bias.normal_()  # a zero-initialised bias would hide a bias added twice or never
    return layer


@needs_onednn
@pytest.mark.parametrize("shape, n_in, n_out", SHAPES)
def test_fused_bias_gives_torchs_bits(shape, n_in, n_out, spelled_out, monkeypatch):
    layer = _layer(n_in, n_out)
    x = torch.randn(shape).bfloat16()
    calls = []
    real = linear_mod.fuses_bias
    monkeypatch.setattr(linear_mod, "fuses_bias", lambda *a: calls.append(real(*a)) or calls[-1])
    with torch.inference_mode():
        out = layer(x)
    assert calls == [True]
    assert out.shape == (*shape[:-1], n_out) and out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))


def test_fp32_training_strided_and_biasless_layers_keep_torchs_linear(spelled_out):
    layer = _layer(96, 192)
    x = torch.randn(4, 16, 96).bfloat16()
    with torch.inference_mode():
        assert fuses_bias(x, layer.weight, layer.bias) == torch.backends.mkldnn.is_available()
        assert not fuses_bias(x.transpose(0, 1), layer.weight, layer.bias)  # strided: other bits in torch
        assert not fuses_bias(x, layer.weight, None)
        assert not fuses_bias(x[:0], layer.weight, layer.bias)
        fp32 = _layer(96, 192, torch.float32)
        assert not fuses_bias(x.float(), fp32.weight, fp32.bias)  # fp32 stays the reference's arithmetic
    # a training step builds a graph through torch's linear: gradients reach the weights
    xg = x.clone().requires_grad_()
    assert not fuses_bias(xg, layer.weight, layer.bias)
    layer(xg).float().sum().backward()
    assert layer.weight.grad is not None and xg.grad is not None


def test_other_cpus_keep_torchs_linear(monkeypatch):
    monkeypatch.setattr(attention_mod, "bf16_products_spelled_out", lambda: False)
    layer = _layer(96, 192)
    with torch.inference_mode():
        assert not fuses_bias(torch.randn(4, 96).bfloat16(), layer.weight, layer.bias)


def test_onednn_switched_off_keeps_torchs_linear(spelled_out):
    layer = _layer(96, 192)
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=False):
        assert not fuses_bias(torch.randn(4, 96).bfloat16(), layer.weight, layer.bias)


def _formula(norm: LayerNorm2d, x: torch.Tensor) -> torch.Tensor:
    """The reference's channel layer norm, written out."""
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + norm.eps) * norm.weight[:, None, None] + norm.bias[:, None, None]


def _norm_and_input(channels: int = 64):
    torch.manual_seed(channels)
    norm = LayerNorm2d(channels)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.3)
    return norm, torch.randn(2, channels, 32, 48) * 3 + 1  # an offset: the mean matters


def test_bf16_inference_layer_norm_2d_is_closer_to_fp32_and_channels_last():
    norm, x = _norm_and_input()
    with torch.inference_mode():
        exact = norm(x)
        xb, nb = x.bfloat16(), LayerNorm2d(64).bfloat16()
        nb.load_state_dict(norm.state_dict())
        out = nb(xb)
        nine_passes = _formula(nb, xb)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)  # what the next convolution reads as is
    err, old_err = (out.float() - exact).abs(), (nine_passes.float() - exact).abs()
    assert err.max() <= 2 ** -7 * exact.abs().max()  # one bf16 rounding of the output, about
    assert err.mean() < old_err.mean()
    # the mask downsampler's first, 4-channel norm: the formula is the faster one there
    few = LayerNorm2d(4).bfloat16()
    xs = xb[:, :4]
    with torch.inference_mode():
        assert torch.equal(few(xs), _formula(few, xs))


def test_fp32_and_training_layer_norm_2d_keep_the_reference_formula():
    norm, x = _norm_and_input()
    with torch.inference_mode():
        assert torch.equal(norm(x), _formula(norm, x))  # fp32: the reference's bits (parity tests)
    nb = LayerNorm2d(64).bfloat16()
    nb.load_state_dict(norm.state_dict())
    xb = x.bfloat16().requires_grad_()
    out = nb(xb)  # a graph is built: the formula, whatever the dtype
    assert torch.equal(out.detach(), _formula(nb, xb).detach())
    out.float().sum().backward()
    assert xb.grad is not None and nb.weight.grad is not None
    # bf16 input into fp32 weights (as under autocast): the formula, which promotes to fp32
    with torch.inference_mode():
        mixed = norm(x.bfloat16())
    assert mixed.dtype == torch.float32 and torch.equal(mixed, _formula(norm, x.bfloat16()))


def _conv(c_in: int, c_out: int) -> torch.nn.Conv2d:
    torch.manual_seed(c_in + c_out)
    conv = torch.nn.Conv2d(c_in, c_out, kernel_size=1)
    with torch.no_grad():
        conv.bias.normal_()
    return conv


def test_pointwise_conv_in_bf16_inference_matches_the_fp32_convolution():
    conv = _conv(256, 32)  # the decoder's projection of the stride-4 level: fp32 weights in a bf16 model
    x = torch.randn(2, 16, 24, 256).permute(0, 3, 1, 2)  # B x C x H x W with channels-last strides, as Hiera's
    with torch.inference_mode():
        exact = conv(x)
        out = pointwise_conv(x.bfloat16(), conv)
    assert out.dtype == torch.bfloat16 and out.shape == exact.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    err = (out.float() - exact).abs()
    assert err.max() <= 2 ** -6 * exact.abs().max() and err.mean() <= 2 ** -8 * exact.abs().mean()
    # a map in torch's own layout is read as well (a copy first)
    with torch.inference_mode():
        plain = pointwise_conv(x.bfloat16().contiguous(), conv)
    assert torch.allclose(plain.float(), out.float(), atol=2 ** -6 * exact.abs().max().item())


def test_pointwise_conv_keeps_the_convolution_in_fp32_and_training():
    conv = _conv(64, 16)
    x = torch.randn(1, 64, 8, 8)
    with torch.inference_mode():
        assert torch.equal(pointwise_conv(x, conv), conv(x))  # fp32: the reference's bits
        # a bf16 map into the fp32 convolution outside bf16 inference is cast up, as before
    xb = x.bfloat16().requires_grad_()
    out = pointwise_conv(xb, conv)  # a graph is built (fine-tuning the decoder): the convolution itself
    assert out.dtype == torch.float32 and torch.equal(out.detach(), conv(x.bfloat16().float()).detach())
    out.sum().backward()
    assert conv.weight.grad is not None and xb.grad is not None


def test_bf16_image_encoder_first_stage_runs_on_contiguous_tokens():
    from napari_sam2.modeling.configs import get_config
    from napari_sam2.modeling.hiera import Hiera

    trunk = Hiera(get_config("sam2.1_hiera_tiny").trunk).eval()
    seen = []
    trunk.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        fp32 = trunk(x)
        trunk.bfloat16()
        bf16 = trunk(x.bfloat16())
    # fp32 keeps the reference's layout (strided tokens); bf16 inference gets contiguous ones (no copies)
    assert seen == [False, True]
    for a, b in zip(fp32, bf16):
        assert (b.float() - a).abs().mean() <= 0.02 * a.abs().mean()


def test_rope_written_into_its_destination_equals_the_rotated_copy():
    angles = axial_rope_angles(32, 4, 4)
    freqs = torch.polar(torch.ones_like(angles), angles)  # 16 positions x 16 pairs
    for dtype in (torch.float32, torch.bfloat16):
        k = torch.randn(2, 1, 3 * 16 + 4, 32).to(dtype)  # three frames of a 4 x 4 grid + 4 pointer tokens
        expected = apply_rope(k[:, :, :48], freqs)
        pointers = k[:, :, 48:].clone()
        apply_rope(k[:, :, :48], freqs, out=k[:, :, :48])
        assert torch.equal(k[:, :, :48], expected) and torch.equal(k[:, :, 48:], pointers)
    x = torch.randn(1, 16, 32)
    before = x.clone()
    apply_rope(x, freqs)
    assert torch.equal(x, before)  # without out=, the input is left as it was (fp32: no in-place rotation)


# ------------------------------------------------------------- a linear layer and its activation in one product
needs_onednn_bf16 = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="oneDNN has no bf16 products on this CPU",
)


@pytest.fixture
def fast_bf16(monkeypatch):
    """Pretend this CPU computes bf16 natively (AMX or AVX-512 BF16), whatever it is."""
    monkeypatch.setattr(attention_mod, "fast_bf16_cpu", lambda: True)


def _runs_fused(layer: torch.nn.Module, x: torch.Tensor, activation: torch.nn.Module) -> tuple[bool, torch.Tensor]:
    """(whether the layer's own forward was skipped, i.e. oneDNN's product ran with the activation; output)."""
    calls = []
    hook = layer.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = linear_activation(x, layer, activation)
    finally:
        hook.remove()
    return not calls, out


@needs_onednn_bf16
@pytest.mark.parametrize("shape, n_in, n_out", SHAPES)
def test_relu_in_the_product_gives_the_same_bits(shape, n_in, n_out, fast_bf16):
    """Memory attention's feed-forward layer (and any ReLU MLP) in bf16 inference: one product whose
    ReLU acts before rounding; rounding keeps signs and zero, so the bits are those of two passes."""
    layer = _layer(n_in, n_out)
    x = torch.randn(shape).bfloat16()
    with torch.inference_mode():
        fused, out = _runs_fused(layer, x, nn.ReLU())
        assert fused
        assert torch.equal(out, F.relu(F.linear(x, layer.weight, layer.bias)))


@needs_onednn_bf16
def test_gelu_in_the_product_is_closer_to_fp32(fast_bf16):
    """GELU of the product's fp32 result, rounded once, against GELU of the rounded product (Hiera's and
    the memory encoder's feed-forward layers)."""
    layer = _layer(96, 384)
    x = torch.randn(64, 32, 96).bfloat16()
    with torch.inference_mode():
        exact = F.gelu(F.linear(x.float(), layer.weight.float(), layer.bias.float()))
        fused, out = _runs_fused(layer, x, nn.GELU())
        assert fused and out.dtype == torch.bfloat16
        two_passes = F.gelu(F.linear(x, layer.weight, layer.bias))
    fused_err, two_pass_err = ((y.float() - exact).abs().mean() for y in (out, two_passes))
    assert fused_err <= two_pass_err, (fused_err, two_pass_err)
    torch.testing.assert_close(out.float(), exact, rtol=2e-2, atol=2e-2)


def test_the_activation_stays_apart_where_the_product_cannot_take_it(fast_bf16):
    """fp32 (the reference's arithmetic), a training step, a strided input, the tanh GELU and a layer
    that is not a plain linear one (LoRA wraps it) keep layer + activation."""
    layer = _layer(96, 192)
    x = torch.randn(4, 16, 96).bfloat16()
    fp32 = _layer(96, 192, torch.float32)
    with torch.inference_mode():
        fused, out = _runs_fused(fp32, x.float(), nn.GELU())
        assert not fused and torch.equal(out, F.gelu(F.linear(x.float(), fp32.weight, fp32.bias)))
        assert not _runs_fused(layer, x.transpose(0, 1), nn.ReLU())[0]
        assert not _runs_fused(layer, x, nn.GELU(approximate="tanh"))[0]
        wrapped = nn.Sequential(layer)  # stands for a LoRA wrapper: its own forward must run
        fused, out = _runs_fused(wrapped, x, nn.ReLU())
        assert not fused and torch.equal(out, F.relu(layer(x)))
    xg = x.clone().requires_grad_()
    fused, out = _runs_fused(layer, xg, nn.ReLU())
    assert not fused
    out.float().sum().backward()
    assert layer.weight.grad is not None and xg.grad is not None


def test_a_cpu_without_fast_bf16_keeps_the_activation_apart(monkeypatch):
    monkeypatch.setattr(attention_mod, "fast_bf16_cpu", lambda: False)
    layer = _layer(96, 192)
    with torch.inference_mode():
        assert not _runs_fused(layer, torch.randn(4, 96).bfloat16(), nn.ReLU())[0]


@needs_onednn_bf16
def test_memory_attention_layer_output_is_unchanged_by_the_fused_relu(fast_bf16, monkeypatch):
    """The whole bf16 memory attention layer gives the same bits with its feed-forward ReLU inside the
    product as with the two passes (the product's own forward is skipped when fused: counted by a hook)."""
    from napari_sam2.modeling.memory_attention import MemoryAttentionLayer

    torch.manual_seed(0)
    layer = MemoryAttentionLayer().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    layer.bfloat16()
    tgt = torch.randn(2, 64, 256).bfloat16()
    memory = torch.randn(2, 2 * 64 + 4, 64).bfloat16()
    keys = memory + torch.randn_like(memory)
    forwards = []
    layer.linear1.register_forward_hook(lambda *a: forwards.append("linear1"))
    with torch.inference_mode():
        fused = layer(tgt, memory, keys, num_k_exclude_rope=4)
        assert forwards == []  # one oneDNN product with the ReLU: linear1's own forward did not run
        monkeypatch.setattr(linear_mod, "onednn_post_op", lambda a: None)
        apart = layer(tgt, memory, keys, num_k_exclude_rope=4)
    assert forwards == ["linear1"]
    assert torch.equal(fused, apart)
