"""The eight official SAM2 model configurations as plain data.

SAM2 (July 2024) and SAM2.1 (September 2024) share the network; SAM2.1 adds a spatial
"no object" embedding to memories and a signed, projected temporal encoding for object pointers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HieraConfig:
    embed_dim: int
    num_heads: int
    stages: tuple[int, int, int, int]
    global_att_blocks: tuple[int, ...]
    window_spec: tuple[int, int, int, int]
    window_pos_embed_bkg_spatial_size: tuple[int, int]

    @property
    def channels(self) -> tuple[int, int, int, int]:
        """Output channels of each stage, shallow to deep."""
        return tuple(self.embed_dim * 2**i for i in range(4))


@dataclass(frozen=True)
class SAM2Config:
    name: str
    version: str  # "sam2" or "sam2.1"
    size: str  # "tiny", "small", "base_plus", "large"
    trunk: HieraConfig
    image_size: int = 1024
    d_model: int = 256
    mem_dim: int = 64
    num_maskmem: int = 7
    max_obj_ptrs_in_encoder: int = 16
    sigmoid_scale_for_mem_enc: float = 20.0
    sigmoid_bias_for_mem_enc: float = -10.0
    # the four flags that differ between sam2 and sam2.1
    no_obj_embed_spatial: bool = False
    add_tpos_enc_to_obj_ptrs: bool = False
    proj_tpos_enc_in_obj_ptrs: bool = False
    use_signed_tpos_enc_to_obj_ptrs: bool = False
    # mask decoder: choose among the 3 multimask outputs by stability when asked for one mask
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98
    # video-mode settings the official video builder applies
    binarize_mask_from_pts_for_mem_enc: bool = True

    @property
    def backbone_channel_list(self) -> tuple[int, int, int, int]:
        """Trunk channels deep to shallow, the order the FPN neck takes them."""
        return tuple(reversed(self.trunk.channels))


_TRUNKS = {
    "tiny": HieraConfig(96, 1, (1, 2, 7, 2), (5, 7, 9), (8, 4, 14, 7), (7, 7)),
    "small": HieraConfig(96, 1, (1, 2, 11, 2), (7, 10, 13), (8, 4, 14, 7), (7, 7)),
    "base_plus": HieraConfig(112, 2, (2, 3, 16, 3), (12, 16, 20), (8, 4, 14, 7), (14, 14)),
    "large": HieraConfig(144, 2, (2, 6, 36, 4), (23, 33, 43), (8, 4, 16, 8), (7, 7)),
}

SIZES = tuple(_TRUNKS)
VERSIONS = ("sam2", "sam2.1")


def _make(version: str, size: str) -> SAM2Config:
    v21 = version == "sam2.1"
    return SAM2Config(
        name=f"{version}_hiera_{size}",
        version=version,
        size=size,
        trunk=_TRUNKS[size],
        no_obj_embed_spatial=v21,
        add_tpos_enc_to_obj_ptrs=v21,
        proj_tpos_enc_in_obj_ptrs=v21,
        use_signed_tpos_enc_to_obj_ptrs=v21,
    )


#: the model used when none is named: the smallest and fastest of the latest version
DEFAULT_MODEL = "sam2.1_hiera_tiny"

CONFIGS: dict[str, SAM2Config] = {
    f"{v}_hiera_{s}": _make(v, s) for v in VERSIONS for s in SIZES
}


def get_config(name: str) -> SAM2Config:
    """The config registered under ``name`` (e.g. ``"sam2.1_hiera_tiny"``)."""
    try:
        return CONFIGS[name]
    except KeyError:
        known = ", ".join(CONFIGS)
        raise ValueError(f"Unknown SAM2 model name {name!r}. Known models: {known}.") from None
