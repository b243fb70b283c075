"""Wrong inputs to the network and to build_model give clear errors, not obscure torch ones."""

from __future__ import annotations

import pytest
import torch

from napari_sam2.build import build_model
from napari_sam2.checkpoints import CheckpointError
from napari_sam2.modeling.configs import CONFIGS


@pytest.fixture(scope="module")
def tiny():
    """sam2.1 tiny with untrained weights (no checkpoint, no reference needed)."""
    return build_model("sam2.1_hiera_tiny", pretrained=False)


# --------------------------------------------------------------------------------------------------
# forward_image
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(1, 1024, 1024), (3, 1024, 1024), (1, 3, 512, 512), (1, 1, 1024, 1024), (1, 3, 1024, 1024, 1)],
    ids=["1x1024x1024", "no-batch-dim", "512px", "one-channel", "5d"],
)
def test_forward_image_wrong_shape(tiny, shape):
    with pytest.raises(ValueError, match=r"B x 3 x 1024 x 1024") as info:
        tiny.forward_image(torch.zeros(shape))
    assert str(tuple(shape)) in str(info.value)  # says what it got


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_forward_image_integer_dtype(tiny, dtype):
    with pytest.raises(TypeError, match="float") as info:
        tiny.forward_image(torch.zeros(1, 3, 1024, 1024, dtype=dtype))
    assert str(dtype) in str(info.value)


# --------------------------------------------------------------------------------------------------
# build_model
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sam2.1_hiera_huge", "sam2.1-hiera-tiny", "", "SAM2.1_HIERA_TINY"])
def test_build_model_unknown_name(name):
    with pytest.raises(ValueError, match="Unknown SAM2 model name") as info:
        build_model(name, pretrained=False)
    message = str(info.value)
    assert repr(name) in message
    for known in CONFIGS:  # lists every known name
        assert known in message
    assert len(CONFIGS) == 8


def test_build_model_checkpoint_of_other_version(require_reference, ref_tiny20):
    """A sam2 tiny file loaded as sam2.1 tiny: the error names the model the file belongs to."""
    _, ckpt = ref_tiny20
    with pytest.raises(CheckpointError) as info:
        build_model("sam2.1_hiera_tiny", checkpoint=ckpt)
    message = str(info.value)
    assert "looks like sam2_hiera_tiny" in message, message
    assert "sam2.1_hiera_tiny" in message  # and which model was asked for
    assert "obj_ptr_tpos_proj" in message  # the missing sam2.1 keys are listed


def test_build_model_checkpoint_of_other_size(require_reference, ref_tiny21):
    """A sam2.1 tiny file loaded as sam2.1 small."""
    _, ckpt = ref_tiny21
    with pytest.raises(CheckpointError) as info:
        build_model("sam2.1_hiera_small", checkpoint=ckpt)
    message = str(info.value)
    assert "looks like sam2.1_hiera_tiny" in message, message
    assert "sam2.1_hiera_small" in message


# --------------------------------------------------------------------------------------------------
# sam_heads prompts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "coords_shape,labels_shape",
    [((1, 3, 2), (1, 2)), ((1, 1, 2), (1, 2)), ((1, 2, 2), (2, 2)), ((1, 2, 2), (2,))],
    ids=["3-coords-2-labels", "1-coord-2-labels", "labels-batch-2", "labels-1d"],
)
def test_sam_heads_points_and_labels_mismatch(tiny, coords_shape, labels_shape):
    embed = torch.zeros(1, 256, 64, 64)
    high_res = (torch.zeros(1, 32, 256, 256), torch.zeros(1, 64, 128, 128))
    point_inputs = {
        "point_coords": torch.full(coords_shape, 500.0),
        "point_labels": torch.ones(labels_shape, dtype=torch.int32),
    }
    with torch.inference_mode(), pytest.raises(ValueError, match="labels"):
        tiny.sam_heads(embed, high_res, point_inputs)


def test_sam_heads_points_batch_differs_from_features(tiny):
    """Two objects' clicks on features of one: an error, not a silent broadcast."""
    embed = torch.zeros(1, 256, 64, 64)
    high_res = (torch.zeros(1, 32, 256, 256), torch.zeros(1, 64, 128, 128))
    point_inputs = {"point_coords": torch.full((2, 1, 2), 500.0), "point_labels": torch.ones(2, 1, dtype=torch.int32)}
    with torch.inference_mode(), pytest.raises(ValueError, match="point_coords"):
        tiny.sam_heads(embed, high_res, point_inputs)


def test_forward_image_double_input_is_cast(tiny):
    """float64 frames (a common numpy default) work: they are cast to the weights' dtype."""
    x = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = tiny.forward_image(x)["vision_features"]
        b = tiny.forward_image(x.double())["vision_features"]
    assert b.dtype == torch.float32
    assert torch.equal(a, b)


@pytest.mark.parametrize("mask_shape", [(1, 1, 256, 256), (3, 1, 256, 256), (2, 256, 256)])
def test_sam_heads_mask_batch_mismatch(tiny, mask_shape):
    feats = torch.randn(2, 256, 64, 64)
    high_res = (torch.randn(2, 32, 256, 256), torch.randn(2, 64, 128, 128))
    with pytest.raises(ValueError, match="mask_inputs") as info:
        tiny.sam_heads(feats, high_res, None, torch.randn(mask_shape))
    assert str(tuple(mask_shape)) in str(info.value)
