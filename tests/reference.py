"""Reference oracle for parity tests (test-only; never imported by the package).

Builds the official SAM2 model from the reference implementation ``sam2==1.1.0`` (PyPI) on CPU with
*seeded random weights*, and saves it in the official checkpoint layout ``{"model": state_dict}``.
Our implementation loads that file and must reproduce the reference's outputs; equal outputs on random
weights mean equal behaviour on the released weights (which cannot be downloaded here).

The reference is imported lazily (inside the functions), so importing this module is cheap and works
without ``sam2`` installed.

Functions
---------
build_reference(name, seed=0, *, perturb=True, obj_score_bias=2.0, fill_hole_area=8, check=False)
    The reference ``sam2.sam2_video_predictor.SAM2VideoPredictor`` (a subclass of
    ``sam2.modeling.sam2_base.SAM2Base``: serves model-level and video parity tests), built exactly
    like ``sam2.build_sam.build_sam2_video_predictor`` (same hydra overrides) but with no checkpoint,
    on CPU, eval mode, every state-dict tensor perturbed by seeded Gaussian noise (std 0.02), and
    +2.0 on the object-score head's output bias so that objects are "present" (see below).
save_official_checkpoint(model, path) -> Path
    ``torch.save({"model": model.state_dict()}, path)``: the official release layout.
reference_checkpoint(name, seed, dirpath) -> Path
    build + save, cached on disk as ``dirpath / f"{name}_seed{seed}.pt"``.
init_state_from_images(predictor, images, video_height, video_width) -> dict
    An ``inference_state`` like ``predictor.init_state(video_path)`` but from an in-memory tensor of
    already resized + normalised frames ``(T, 3, 1024, 1024)``: no JPEG round trip.
sanity_report(model, seed=0, backbone_out=None) -> dict
    Runs the image encoder and the mask decoder on a random image and one click; statistics that
    show the perturbed weights still give finite, non-saturated outputs.

Quirks of the reference on CPU that this module handles
-------------------------------------------------------
* Random weights give object-score logits of about 0 +- 0.2: the presence decision (score > 0) would
  flip from frame to frame and between implementations on float noise, and "absent" frames have
  all -1024 masks. ``obj_score_bias`` (default +2.0, added to the head's last bias) makes objects
  present; use -2.0 to test the no-object path. The mask logits themselves stay small (std ~0.2):
  compare logits with a tolerance, not thresholded masks.
* ``fill_hole_area=8`` (set by the official video builder) calls the CUDA extension ``sam2._C``.
  Without it the reference *warns and silently skips* hole filling, so the CPU reference would not
  behave like the official release on its intended hardware. We install an exact CPU equivalent of
  ``sam2.utils.misc.get_connected_components`` (8-connectivity, scipy) so the reference does fill
  holes. Pass ``fill_hole_area=0`` to get the no-hole-filling behaviour instead.
* The video predictor stores memory features in bfloat16. On CPU without autocast its memory attention
  then fails ("mat1 and mat2 must have the same dtype") when the memory holds no fp32 object-pointer
  tokens (e.g. an object whose only prompts lie ahead of the current frame). We cast ``memory`` and
  ``memory_pos`` to the dtype of ``curr`` right before ``memory_attention``. Numerically this is a
  no-op wherever the reference works: ``torch.cat`` of bf16 memories with fp32 pointers already
  promotes to fp32. The bf16 rounding of the stored memory is kept (as in the official code).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

# our model names -> config file inside the installed `sam2` package (hydra config module "sam2")
_SIZE_SUFFIX = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
REFERENCE_NAMES = tuple(
    f"{version}_hiera_{size}" for version in ("sam2", "sam2.1") for size in _SIZE_SUFFIX
)

# The same overrides as sam2.build_sam.build_sam2_video_predictor (sam2==1.1.0) with
# apply_postprocessing=True and vos_optimized=False.
VIDEO_PREDICTOR_OVERRIDES = (
    "++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor",
    # dynamically fall back to multi-mask if the single mask is not stable
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
    # sigmoid mask logits on interacted frames with clicks are binarised for the memory encoder
    "++model.binarize_mask_from_pts_for_mem_enc=true",
    # fill small holes in the low-res masks up to `fill_hole_area`
    "++model.fill_hole_area=8",
)

PERTURB_STD = 0.02
OBJ_SCORE_BIAS = 2.0


def _obj_score_head_bias(model: torch.nn.Module) -> torch.nn.Parameter:
    head = model.sam_mask_decoder.pred_obj_score_head
    last = head.layers[-1] if hasattr(head, "layers") else head  # MLP (pred_obj_scores_mlp) or Linear
    return last.bias


def config_file(name: str) -> str:
    """Config path inside the ``sam2`` package for one of our 8 model names.

    >>> config_file("sam2.1_hiera_base_plus")
    'configs/sam2.1/sam2.1_hiera_b+.yaml'
    """
    for version in ("sam2.1", "sam2"):  # "sam2.1" first: "sam2" is a prefix of it
        prefix = f"{version}_hiera_"
        if name.startswith(prefix) and name[len(prefix):] in _SIZE_SUFFIX:
            size = _SIZE_SUFFIX[name[len(prefix):]]
            return f"configs/{version}/{version}_hiera_{size}.yaml"
    raise ValueError(f"unknown model name {name!r}; expected one of {', '.join(REFERENCE_NAMES)}")


# --------------------------------------------------------------------------------------------------
# CPU stand-ins for the reference's CUDA-only / CUDA-assuming bits
# --------------------------------------------------------------------------------------------------


def cpu_get_connected_components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU equivalent of ``sam2.utils.misc.get_connected_components`` (the ``sam2._C`` kernel).

    Parameters
    ----------
    mask : torch.Tensor
        Binary masks, shape (N, 1, H, W); nonzero = foreground.

    Returns
    -------
    labels : torch.Tensor, int32, (N, 1, H, W)
        Connected-component id (8-connectivity) for foreground pixels, 0 for background.
    counts : torch.Tensor, int32, (N, 1, H, W)
        Area of the pixel's component for foreground pixels, 0 for background.

    Component ids differ from the CUDA kernel's (which uses union-find roots), but the only consumer,
    ``fill_holes_in_mask_scores``, uses ``labels > 0`` and ``counts`` only.
    """
    from scipy import ndimage

    assert mask.dim() == 4 and mask.shape[1] == 1, f"expected (N, 1, H, W), got {tuple(mask.shape)}"
    m = mask.detach().to("cpu").numpy().astype(bool)
    labels = np.zeros(m.shape, dtype=np.int32)
    counts = np.zeros(m.shape, dtype=np.int32)
    structure = np.ones((3, 3), dtype=bool)  # 8-connectivity
    for i in range(m.shape[0]):
        lab, n = ndimage.label(m[i, 0], structure=structure)
        if n:
            areas = np.bincount(lab.ravel()).astype(np.int32)
            areas[0] = 0
            labels[i, 0] = lab
            counts[i, 0] = areas[lab]
    return torch.from_numpy(labels).to(mask.device), torch.from_numpy(counts).to(mask.device)


def install_cpu_connected_components() -> None:
    """Make ``sam2.utils.misc.get_connected_components`` work without the ``sam2._C`` extension.

    Process-wide and idempotent. Keeps the real CUDA kernel where ``sam2._C`` is importable.
    """
    import sam2.utils.misc as misc

    if getattr(misc.get_connected_components, "_napari_sam2_cpu", False):
        return
    try:
        from sam2 import _C  # noqa: F401  (real extension present: leave it alone)

        return
    except ImportError:
        pass

    def get_connected_components(mask):
        return cpu_get_connected_components(mask)

    get_connected_components._napari_sam2_cpu = True  # type: ignore[attr-defined]
    misc.get_connected_components = get_connected_components


def _cast_memory_to_curr_dtype(model: torch.nn.Module) -> None:
    """Wrap ``model.memory_attention.forward`` so bf16 memories work on CPU (see module docstring)."""
    mem_attn = model.memory_attention
    if getattr(mem_attn, "_napari_sam2_cast", False):
        return
    orig_forward = mem_attn.forward

    def forward(curr, memory, curr_pos=None, memory_pos=None, num_obj_ptr_tokens=0):
        dtype = curr[0].dtype if isinstance(curr, list) else curr.dtype
        memory = memory.to(dtype)
        if memory_pos is not None:
            memory_pos = memory_pos.to(dtype)
        return orig_forward(
            curr, memory, curr_pos=curr_pos, memory_pos=memory_pos,
            num_obj_ptr_tokens=num_obj_ptr_tokens,
        )

    mem_attn.forward = forward
    mem_attn._napari_sam2_cast = True


# --------------------------------------------------------------------------------------------------
# building, perturbing, saving
# --------------------------------------------------------------------------------------------------


def _compose(name: str, overrides: list[str]):
    import sam2  # noqa: F401  (its __init__ initialises hydra on the "sam2" config module)
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    if not GlobalHydra.instance().is_initialized():  # someone cleared it: initialise again
        initialize_config_module("sam2", version_base="1.2")
    cfg = compose(config_name=config_file(name), overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0, std: float = PERTURB_STD) -> torch.nn.Module:
    """Add seeded N(0, std²) noise to every floating tensor of ``model.state_dict()`` in place.

    Covers parameters and persistent buffers (the prompt encoder's random Fourier matrix), so no
    zero-initialised tensor (pos_embed, no_obj_ptr, no_mem_embed, maskmem_tpos_enc, biases, ...)
    or tiny layer scale (1e-6) can hide a bug. Deterministic: state-dict order, one CPU generator.
    """
    g = torch.Generator().manual_seed(int(seed))
    for t in model.state_dict(keep_vars=True).values():
        if t.is_floating_point():
            t.add_((torch.randn(t.shape, generator=g) * std).to(t.dtype))
    return model


def _instantiate(name: str, overrides, seed: int, image_size: int | None) -> torch.nn.Module:
    """The reference model of config ``name`` with ``overrides``, initialised from ``seed`` (the
    caller's RNG state untouched), on CPU."""
    from hydra.utils import instantiate

    overrides = list(overrides)
    if image_size is not None:
        # a smaller input (e.g. 512) keeps parity tests fast; every module adapts to it
        overrides.append(f"++model.image_size={int(image_size)}")
    cfg = _compose(name, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = instantiate(cfg.model, _recursive_=True)
    return model.to("cpu")


def build_reference(
    name: str,
    seed: int = 0,
    *,
    perturb: bool = True,
    obj_score_bias: float = OBJ_SCORE_BIAS,
    fill_hole_area: int = 8,
    check: bool = False,
    image_size: int | None = None,
) -> torch.nn.Module:
    """Reference SAM2 (``sam2.sam2_video_predictor.SAM2VideoPredictor``) with seeded random weights.

    Parameters
    ----------
    name : str
        One of ``REFERENCE_NAMES``: "sam2_hiera_tiny", "sam2.1_hiera_tiny", ... "_small",
        "_base_plus", "_large".
    seed : int
        Seeds both the module initialisation (global RNG forked, so the caller's RNG state is left
        untouched) and the perturbation. Same (name, seed) -> bit-identical weights.
    perturb : bool
        Add N(0, 0.02²) to every state-dict tensor (default). False gives the plain (seeded) init.
    obj_score_bias : float
        Added to the bias of the last layer of the object-score head
        (``sam_mask_decoder.pred_obj_score_head``). With random weights the object-score logit is
        about 0 +- 0.2, so "object present" would be a coin flip per frame (and absent frames give
        all -1024 masks); +2.0 (default) makes objects present, -2.0 exercises the no-object path,
        0.0 leaves the random head alone. Only applied when ``perturb`` is true.
    fill_hole_area : int
        The official video builder sets 8. 0 disables hole filling (= what the reference does on a
        machine without its CUDA extension).
    image_size : int, optional
        Network input size (default: the config's 1024).
    check : bool
        Run ``sanity_report`` and raise if outputs are not finite or the logits saturate.

    Returns
    -------
    torch.nn.Module
        On CPU, eval mode, float32.
    """
    model = _instantiate(name, VIDEO_PREDICTOR_OVERRIDES, seed, image_size).eval()
    if perturb:
        perturb_(model, seed)
        if obj_score_bias:
            _obj_score_head_bias(model).data.add_(float(obj_score_bias))
    model.fill_hole_area = int(fill_hole_area)
    install_cpu_connected_components()
    _cast_memory_to_curr_dtype(model)
    model.reference_name = name
    model.reference_seed = int(seed)
    if check:
        report = sanity_report(model, seed=seed)
        problems = [k for k, ok in report["checks"].items() if not ok]
        if problems:
            raise AssertionError(f"reference {name} seed {seed} looks broken: {problems}: {report}")
    return model


# The prompt-simulation settings of sam2/configs/sam2.1_training/sam2.1_hiera_b+_MOSE_finetune.yaml.
TRAINER_OVERRIDES = (
    "++model._target_=training.model.sam2.SAM2Train",
    "++model.prob_to_use_pt_input_for_train=0.5",
    "++model.prob_to_use_box_input_for_train=0.5",
    "++model.prob_to_sample_from_gt_for_train=0.1",
    "++model.num_frames_to_correct_for_train=2",
    "++model.rand_frames_to_correct_for_train=true",
    "++model.add_all_frames_to_correct_as_cond=true",
    "++model.num_init_cond_frames_for_train=2",
    "++model.rand_init_cond_frames_for_train=true",
    "++model.num_correction_pt_per_frame=7",
)


def build_reference_trainer(name: str, seed: int = 0, *, image_size: int | None = None,
                            obj_score_bias: float = OBJ_SCORE_BIAS) -> torch.nn.Module:
    """The reference's training model ``training.model.sam2.SAM2Train`` with the fine-tuning recipe's
    prompt settings and seeded, perturbed weights (as :func:`build_reference`), in training mode
    with every dropout off (so that its forward pass is deterministic and comparable).

    Needs the reference's ``training`` package importable (see SAM2_FACTS: tensordict & co.)."""
    model = _instantiate(name, TRAINER_OVERRIDES, seed, image_size)
    perturb_(model, seed)
    if obj_score_bias:
        _obj_score_head_bias(model).data.add_(float(obj_score_bias))
    return dropout_off(model.train())


def dropout_off(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout (and drop-path) of a model in training mode set to 0: a deterministic forward pass,
    for comparing the reference's and our training step (works on both)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    return model


def save_official_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Save ``{"model": model.state_dict()}`` (the official release layout) to ``path``.

    The official loader (``sam2.build_sam._load_checkpoint``) loads ``ckpt["model"]`` strictly into
    SAM2Base, so the reference model's state dict *is* the official key set: parameters plus the one
    persistent buffer ``sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix``
    (471 keys for sam2.1 tiny, 468 for sam2 tiny). Written atomically.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"model": sd}, tmp)
    os.replace(tmp, path)
    return path


def reference_checkpoint(name: str, seed: int, dirpath: str | os.PathLike) -> Path:
    """Path of the official-layout checkpoint of ``build_reference(name, seed)``, cached in ``dirpath``."""
    path = Path(dirpath) / f"{name}_seed{int(seed)}.pt"
    if not path.exists():
        save_official_checkpoint(build_reference(name, seed), path)
    return path


# --------------------------------------------------------------------------------------------------
# helpers for parity tests
# --------------------------------------------------------------------------------------------------


def init_state_from_images(
    predictor: torch.nn.Module,
    images: torch.Tensor,
    video_height: int,
    video_width: int,
) -> dict[str, Any]:
    """``predictor.init_state`` without files: ``images`` are frames already resized to
    ``predictor.image_size`` and normalised (ImageNet mean/std), shape (T, 3, 1024, 1024), float32.

    Mirrors ``SAM2VideoPredictor.init_state`` of sam2==1.1.0 (offload options off), including the
    warm-up encoding of frame 0.
    """
    from collections import OrderedDict

    size = predictor.image_size
    assert images.dim() == 4 and tuple(images.shape[1:]) == (3, size, size), (
        f"images must be (T, 3, {size}, {size}), got {tuple(images.shape)}"
    )
    device = predictor.device
    state: dict[str, Any] = {
        "images": images.to(device, torch.float32),
        "num_frames": len(images),
        "offload_video_to_cpu": False,
        "offload_state_to_cpu": False,
        "video_height": int(video_height),
        "video_width": int(video_width),
        "device": device,
        "storage_device": device,
        "point_inputs_per_obj": {},
        "mask_inputs_per_obj": {},
        "cached_features": {},
        "constants": {},
        "obj_id_to_idx": OrderedDict(),
        "obj_idx_to_id": OrderedDict(),
        "obj_ids": [],
        "output_dict_per_obj": {},
        "temp_output_dict_per_obj": {},
        "frames_tracked_per_obj": {},
    }
    with torch.inference_mode():
        predictor._get_image_feature(state, frame_idx=0, batch_size=1)
    return state


def sanity_image(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    """The seeded random input image of ``sanity_report``, shape (1, 3, 1024, 1024)."""
    g = torch.Generator().manual_seed(int(seed))
    size = model.image_size
    return torch.randn(1, 3, size, size, generator=g)


@torch.no_grad()
def sanity_report(
    model: torch.nn.Module, seed: int = 0, backbone_out: dict | None = None
) -> dict[str, Any]:
    """Image encoder + mask decoder on a random image and one positive click.

    Returns shapes, stats and ``checks`` (name -> bool): finite features, finite logits, mask logits
    not saturated (|logit| > 30 for under half the pixels, not all of one sign), IoU in [0, 1],
    object present. ``backbone_out``: ``model.forward_image(sanity_image(model, seed))`` when
    already computed (saves an encoder run).
    """
    size = model.image_size
    out = backbone_out if backbone_out is not None else model.forward_image(sanity_image(model, seed))
    _, vision_feats, _, feat_sizes = model._prepare_backbone_features(out)
    B = 1
    C = model.hidden_dim
    # same layout as SAM2ImagePredictor: last level + no_mem_embed, high-res levels for the decoder
    vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
    feats = [
        f.permute(1, 2, 0).view(B, -1, *s) for f, s in zip(vision_feats[::-1], feat_sizes[::-1])
    ][::-1]
    pix = feats[-1]
    assert pix.shape[1] == C
    high_res = feats[:-1]
    point_inputs = {
        "point_coords": torch.tensor([[[size * 0.4, size * 0.55]]]),
        "point_labels": torch.tensor([[1]], dtype=torch.int32),
    }
    (low_res_multimasks, high_res_multimasks, ious, low_res_masks, high_res_masks, obj_ptr,
     object_score_logits) = model._forward_sam_heads(
        backbone_features=pix,
        point_inputs=point_inputs,
        mask_inputs=None,
        high_res_features=high_res,
        multimask_output=True,
    )
    fpn = out["backbone_fpn"]
    logits = low_res_multimasks
    saturated = (logits.abs() > 30).float().mean().item()
    pos_frac = (logits > 0).float().mean().item()
    checks = {
        "features_finite": all(bool(torch.isfinite(f).all()) for f in fpn),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "logits_not_saturated": saturated < 0.5,
        "logits_mixed_sign": 0.0 < pos_frac < 1.0 or float(logits.std()) > 0.1,
        "iou_in_range": bool(((ious >= 0) & (ious <= 1)).all()),
        "obj_ptr_finite": bool(torch.isfinite(obj_ptr).all()),
        "object_score_finite": bool(torch.isfinite(object_score_logits).all()),
        # with the default obj_score_bias the object must be present (else masks are all -1024)
        "object_present": bool((object_score_logits > 0).all()),
    }
    return {
        "backbone_fpn_shapes": [tuple(f.shape) for f in fpn],
        "feature_std": [float(f.std()) for f in fpn],
        "mask_logits_shape": tuple(logits.shape),
        "mask_logits_mean": float(logits.mean()),
        "mask_logits_std": float(logits.std()),
        "mask_logits_saturated_frac": saturated,
        "mask_logits_positive_frac": pos_frac,
        "ious": ious.flatten().tolist(),
        "object_score_logits": object_score_logits.flatten().tolist(),
        "checks": checks,
    }
