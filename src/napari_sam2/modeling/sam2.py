"""SAM2: the whole network and one tracking step.

A tracking step on frame t for a batch of objects:
  image features (computed once per frame)
  -> memory attention over the memory bank (conditioning frames, up to 6 recent frames, object pointers)
  -> prompt encoder + mask decoder (clicks, boxes, a mask, or none) -> mask, IoU, object score, pointer
  -> memory encoder -> this frame's memory, for the frames that follow.

The memory bank is passed in as a mapping ``{"cond_frame_outputs": {t: entry}, "non_cond_frame_outputs":
{t: entry}}`` whose entries hold ``maskmem_features`` (B x 64 x 64 x 64) and ``obj_ptr`` (B x 256): the
layout the official predictor keeps, so a caller may back it with anything (RAM, disk, a window of
recent frames) as long as it can answer for the frames a step looks at (:meth:`SAM2.memory_frames`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .common import MLP, resize_masks
from .configs import SAM2Config
from .image_encoder import ImageEncoder
from .linear import pointwise_conv
from .mask_decoder import MaskDecoder
from .memory_attention import MemoryAttention
from .memory_encoder import MemoryEncoder
from .position_encoding import get_1d_sine_pe
from .prompt_encoder import PromptEncoder

NO_OBJ_SCORE = -1024.0  # logits given to every pixel of an object judged absent


@dataclass
class FrameFeatures:
    """Image features of one frame, batched over objects (B)."""

    embed: torch.Tensor  # B x 256 x 64 x 64 (stride 16)
    pos: torch.Tensor  # B x 256 x 64 x 64 position map of ``embed``
    high_res: tuple[torch.Tensor, torch.Tensor]  # B x 32 x 256^2, B x 64 x 128^2

    @property
    def batch_size(self) -> int:
        return self.embed.shape[0]

    def expand(self, b: int) -> FrameFeatures:
        """The same features repeated for ``b`` objects (views, no copy)."""
        if b == self.batch_size:
            return self
        ex = lambda t: t.expand(b, *t.shape[1:])  # noqa: E731
        return FrameFeatures(ex(self.embed), ex(self.pos), (ex(self.high_res[0]), ex(self.high_res[1])))

    def to(self, device) -> FrameFeatures:
        return FrameFeatures(self.embed.to(device), self.pos.to(device), tuple(h.to(device) for h in self.high_res))


class SAM2(nn.Module):
    """The SAM2 network, with the official checkpoints' parameter names."""

    def __init__(self, cfg: SAM2Config):
        super().__init__()
        self.cfg = cfg
        d, mem = cfg.d_model, cfg.mem_dim
        self.image_size = cfg.image_size
        emb = cfg.image_size // 16
        self.image_encoder = ImageEncoder(cfg)
        self.memory_attention = MemoryAttention(d, mem)
        self.memory_encoder = MemoryEncoder(d, mem)
        self.sam_prompt_encoder = PromptEncoder(d, (emb, emb), (cfg.image_size, cfg.image_size))
        self.sam_mask_decoder = MaskDecoder(
            d,
            dynamic_multimask_stability_delta=cfg.dynamic_multimask_stability_delta,
            dynamic_multimask_stability_thresh=cfg.dynamic_multimask_stability_thresh,
        )
        self.num_maskmem = cfg.num_maskmem
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(cfg.num_maskmem, 1, 1, mem))
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, d))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, d))
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, d))
        if cfg.no_obj_embed_spatial:
            self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, mem))
        else:
            self.no_obj_embed_spatial = None
        self.obj_ptr_proj = MLP(d, d, d, 3)
        self.obj_ptr_tpos_proj = nn.Linear(d, mem) if cfg.proj_tpos_enc_in_obj_ptrs else nn.Identity()
        # a mask prompt is downsampled 4x before it goes through the SAM heads for its pointer
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)

    @property
    def device(self) -> torch.device:
        return self.no_mem_embed.device

    # the modules that hold nearly all of a frame's arithmetic; the SAM heads stay fp32 (they are light,
    # and masks, IoUs and object scores are where bf16 rounding would show)
    HEAVY_MODULES = ("image_encoder", "memory_attention", "memory_encoder")

    def set_precision(self, dtype: torch.dtype) -> SAM2:
        """Compute image features, memory attention and memories in ``dtype`` (float32 or bfloat16)."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the network computes in float32 or bfloat16, not {dtype}.")
        for name in self.HEAVY_MODULES:
            getattr(self, name).to(dtype)
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of image features and memory attention (what :meth:`set_precision` chose)."""
        return self.memory_attention.norm.weight.dtype

    @property
    def precision(self) -> str:
        return "bf16" if self.compute_dtype == torch.bfloat16 else "fp32"

    def _heads_dtype(self) -> torch.dtype:
        return self.sam_mask_decoder.conv_s0.weight.dtype

    # ------------------------------------------------------------------ image features
    def forward_image(self, image: torch.Tensor, encoder_grad: bool = True) -> dict:
        """B x 3 x 1024 x 1024 normalised images -> ``vision_features``, ``vision_pos_enc``,
        ``backbone_fpn`` (the two high-resolution levels already projected for the decoder).
        ``encoder_grad=False``: the image encoder builds no graph (frozen in fine-tuning) while the
        decoder's projections of its high-resolution levels still learn."""
        return self.project_high_res(self.run_image_encoder(image, encoder_grad))

    def run_image_encoder(self, image: torch.Tensor, encoder_grad: bool = True) -> dict:
        """The image encoder alone on checked input: :meth:`forward_image` before the decoder's
        projections (what stays the same while only the decoder trains)."""
        expected = (3, self.image_size, self.image_size)
        if image.ndim != 4 or tuple(image.shape[1:]) != expected:
            raise ValueError(
                f"forward_image expects a B x 3 x {self.image_size} x {self.image_size} float tensor, "
                f"got shape {tuple(image.shape)}. Resize and normalise frames first."
            )
        if not image.is_floating_point():
            raise TypeError(
                f"forward_image expects a float tensor (normalised with ImageNet mean/std), got {image.dtype}."
            )
        # float64 / float16 input is cast to the encoder's dtype
        with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
            return self.image_encoder(image.to(self.compute_dtype))

    def project_high_res(self, encoder_out: dict) -> dict:
        """The image encoder's output (not changed) with its two high-resolution levels projected by the
        decoder's convolutions (part of the decoder: they learn while a frozen encoder's output stays)."""
        fpn = list(encoder_out["backbone_fpn"])
        fpn[0] = pointwise_conv(fpn[0], self.sam_mask_decoder.conv_s0)
        fpn[1] = pointwise_conv(fpn[1], self.sam_mask_decoder.conv_s1)
        return {**encoder_out, "backbone_fpn": fpn}

    def frame_features(self, backbone_out: dict) -> FrameFeatures:
        """Pick the three levels SAM2 uses out of :meth:`forward_image`'s output, in the compute dtype
        (what is cached per frame; the SAM heads cast what they read)."""
        fpn, pos = backbone_out["backbone_fpn"], backbone_out["vision_pos_enc"]
        dtype = self.compute_dtype
        # contiguous: bf16 inference projects the high-resolution levels channels-last, and a strided level
        # handed to the cache's writer thread is copied there, in that thread's heap (one run: peak RSS over
        # 300 frames 1.11x that over 30; with the copy made here, about 1 ms a frame, 0.96x)
        high_res = tuple(f.to(dtype).contiguous() for f in fpn[:2])
        return FrameFeatures(embed=fpn[-1].to(dtype), pos=pos[-1].to(dtype), high_res=high_res)

    def encode_frame(self, image: torch.Tensor, encoder_grad: bool = True) -> FrameFeatures:
        # the plain call when the encoder learns: callers may wrap forward_image(image) (the parity tests do)
        out = self.forward_image(image) if encoder_grad else self.forward_image(image, encoder_grad=False)
        return self.frame_features(out)

    def features_from_levels(self, embed: torch.Tensor, high_res0: torch.Tensor, high_res1: torch.Tensor) -> FrameFeatures:
        """FrameFeatures from the three stored levels (the position map depends only on the size)."""
        pos = self.image_encoder.neck.position_encoding(embed)
        return FrameFeatures(embed, pos, (high_res0, high_res1))

    # ------------------------------------------------------------------ SAM heads
    def sam_heads(
        self,
        embed: torch.Tensor,
        high_res: tuple[torch.Tensor, torch.Tensor],
        point_inputs: dict | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> dict:
        """Prompt encoder + mask decoder on (memory-conditioned) features B x 256 x 64 x 64.

        point_inputs: {"point_coords": B x N x 2 (x, y in 1024 input pixels), "point_labels": B x N};
        mask_inputs: B x 1 x h x w logits (resized to 256^2). Returns multimask and best-mask logits at
        256^2 and 1024^2, IoU, object pointer (B x 256) and object-score logits (B x 1).
        """
        b = embed.shape[0]
        heads = self._heads_dtype()
        embed = embed.to(heads)
        high_res = tuple(h.to(heads) for h in high_res)
        if point_inputs is not None:
            coords, labels = point_inputs["point_coords"], point_inputs["point_labels"]
            if coords.ndim != 3 or coords.shape[-1] != 2 or coords.shape[0] != b:
                raise ValueError(f"point_coords must be B x N x 2 with B = {b}, got {tuple(coords.shape)}.")
            if tuple(labels.shape) != tuple(coords.shape[:2]):
                raise ValueError(
                    f"point_labels must be B x N matching point_coords {tuple(coords.shape)}: got labels of shape "
                    f"{tuple(labels.shape)} (one label per point)."
                )
        else:
            coords = embed.new_zeros(b, 1, 2)
            labels = -torch.ones(b, 1, dtype=torch.int32, device=embed.device)
        mask_prompt = None
        if mask_inputs is not None:
            if mask_inputs.ndim != 4 or tuple(mask_inputs.shape[:2]) != (b, 1):
                raise ValueError(f"mask_inputs must be B x 1 x H x W with B = {b}, got {tuple(mask_inputs.shape)}.")
            size = self.sam_prompt_encoder.mask_input_size
            mask_prompt = mask_inputs
            if tuple(mask_inputs.shape[-2:]) != size:
                mask_prompt = resize_masks(mask_inputs.float(), size, antialias=True)
        sparse, dense = self.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=mask_prompt)
        multi, ious, tokens, obj_score = self.sam_mask_decoder(
            image_embeddings=embed,
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            high_res_features=list(high_res),
        )
        present = obj_score > 0  # B x 1
        multi = torch.where(present[:, None, None], multi, NO_OBJ_SCORE).float()
        multi_hr = resize_masks(multi, (self.image_size, self.image_size))
        token = tokens[:, 0]
        if multimask_output:
            best = ious.argmax(dim=-1)
            rows = torch.arange(b, device=embed.device)
            low, high = multi[rows, best].unsqueeze(1), multi_hr[rows, best].unsqueeze(1)
            token = tokens[rows, best]
        else:
            low, high = multi, multi_hr
        obj_ptr = self._gate_pointer(self.obj_ptr_proj(token), present.float())
        return {
            "multimasks": multi,
            "multimasks_high_res": multi_hr,
            "ious": ious,
            "pred_masks": low,
            "pred_masks_high_res": high,
            "obj_ptr": obj_ptr,
            "object_score_logits": obj_score,
        }

    def _gate_pointer(self, obj_ptr: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """An absent object's pointer is the learned ``no_obj_ptr``."""
        return present * obj_ptr + (1 - present) * self.no_obj_ptr

    def mask_as_output(self, embed, high_res, mask_inputs: torch.Tensor) -> dict:
        """A mask prompt on a conditioning frame is taken as the output as is (scaled to logits);
        the SAM heads only run to get its object pointer."""
        scale, bias = self.cfg.sigmoid_scale_for_mem_enc, self.cfg.sigmoid_bias_for_mem_enc
        m = mask_inputs.float()
        high = m * scale + bias
        low = resize_masks(high, (high.shape[-2] // 4, high.shape[-1] // 4), antialias=True)
        ptr = self.sam_heads(embed, high_res, mask_inputs=self.mask_downsample(m))["obj_ptr"]
        present = (m.flatten(1) > 0).any(dim=1, keepdim=True).float()
        return {
            "multimasks": low,
            "multimasks_high_res": high,
            "ious": m.new_ones(m.shape[0], 1),
            "pred_masks": low,
            "pred_masks_high_res": high,
            "obj_ptr": self._gate_pointer(ptr, present),
            "object_score_logits": scale * present + bias,
        }

    # ------------------------------------------------------------------ memory
    def memory_frames(self, frame_idx: int, num_frames: int, reverse: bool = False) -> tuple[list[int], list[int]]:
        """Non-conditioning frames a step on ``frame_idx`` may read: (spatial memories, pointers),
        nearest first. Lets a caller keep only these in memory."""
        sign = 1 if reverse else -1
        spatial = [frame_idx + sign * r for r in range(1, self.num_maskmem)]
        n_ptr = min(num_frames, self.cfg.max_obj_ptrs_in_encoder)
        ptrs = [t for t in (frame_idx + sign * r for r in range(1, n_ptr)) if 0 <= t < num_frames]
        return spatial, ptrs

    def condition_on_memory(
        self,
        feats: FrameFeatures,
        frame_idx: int,
        memory: Mapping,
        num_frames: int,
        reverse: bool = False,
    ) -> torch.Tensor:
        """Memory attention of the frame's features over the memory bank -> B x 256 x 64 x 64."""
        b, c, h, w = feats.embed.shape
        cond: Mapping = memory["cond_frame_outputs"]
        non_cond: Mapping = memory["non_cond_frame_outputs"]
        if len(cond) == 0:
            raise ValueError(
                f"Frame {frame_idx} is not a conditioning frame and the memory bank holds no conditioning "
                "frame: add a prompt (click, box or mask) on some frame first."
            )
        dtype = self.compute_dtype
        mem_pos_map = None
        tokens, token_pos = [], []

        def add_memory(entry, tpos_index: int):
            nonlocal mem_pos_map
            f = entry["maskmem_features"].to(feats.embed.device, dtype)  # stored in bf16 by the video predictor
            if mem_pos_map is None:
                # the memory position map is the same for every frame: compute it once
                mem_pos_map = self.memory_encoder.position_encoding(f).to(dtype).flatten(2).transpose(1, 2)
            tokens.append(f.flatten(2).transpose(1, 2))  # B x HW x 64
            token_pos.append((mem_pos_map + self.maskmem_tpos_enc[tpos_index].reshape(1, 1, -1)).to(dtype))

        last = self.num_maskmem - 1
        for entry in cond.values():
            add_memory(entry, last)
        spatial, ptr_frames = self.memory_frames(frame_idx, num_frames, reverse)
        # farthest first: the official concatenation order, which fixes the float summation order
        for r in range(len(spatial), 0, -1):
            entry = non_cond.get(spatial[r - 1])
            if entry is not None:
                add_memory(entry, r - 1)

        sign = -1 if reverse else 1
        signed = self.cfg.use_signed_tpos_enc_to_obj_ptrs
        if self.training:
            # training clips see the pointers of every conditioning frame, later ones included (the
            # reference's recipe); tracking uses only those already passed
            past_cond = dict(cond)
        else:
            past_cond = {t: e for t, e in cond.items() if (t >= frame_idx if reverse else t <= frame_idx)}
        ptr_pos = [((frame_idx - t) * sign if signed else abs(frame_idx - t)) for t in past_cond]
        ptrs = [e["obj_ptr"] for e in past_cond.values()]
        for r, t in enumerate(ptr_frames, start=1):
            entry = non_cond.get(t)
            if entry is not None:
                ptr_pos.append(r)
                ptrs.append(entry["obj_ptr"])
        n_ptr_tokens = 0
        if ptrs:
            mem = self.cfg.mem_dim
            obj_ptrs = torch.stack([p.to(feats.embed.device, dtype) for p in ptrs], dim=1)  # B x P x 256
            n = obj_ptrs.shape[1]
            if self.cfg.add_tpos_enc_to_obj_ptrs:
                # a 1-frame video would divide by zero
                t_max = max(min(num_frames, self.cfg.max_obj_ptrs_in_encoder) - 1, 1)
                rel = torch.tensor(ptr_pos, device=feats.embed.device) / t_max
                tdim = c if self.cfg.proj_tpos_enc_in_obj_ptrs else mem
                ptr_pe = self.obj_ptr_tpos_proj(get_1d_sine_pe(rel, tdim)).to(dtype)  # P x 64
            else:
                ptr_pe = obj_ptrs.new_zeros(n, mem)
            # each 256-d pointer becomes c // mem tokens of width mem, sharing its temporal encoding
            split = c // mem
            tokens.append(obj_ptrs.reshape(b, n * split, mem))
            token_pos.append(ptr_pe.repeat_interleave(split, dim=0).unsqueeze(0).expand(b, -1, -1))
            n_ptr_tokens = n * split

        # objects of a batch on one frame see the same features (expanded views): give memory attention
        # one copy, so that what does not depend on the memory runs once for the batch
        shared = b > 1 and feats.embed.stride(0) == 0 and feats.pos.stride(0) == 0
        embed, pos = (feats.embed[:1], feats.pos[:1]) if shared else (feats.embed, feats.pos)
        curr = embed.to(dtype).flatten(2).transpose(1, 2)  # 1 or B x HW x C
        curr_pos = pos.to(dtype).flatten(2).transpose(1, 2)
        out = self.memory_attention(
            curr, curr_pos, torch.cat(tokens, dim=1), torch.cat(token_pos, dim=1), num_obj_ptr_tokens=n_ptr_tokens
        )
        return out.transpose(1, 2).reshape(b, c, h, w)

    def encode_memory(
        self,
        feats: FrameFeatures,
        masks_high_res: torch.Tensor,
        object_score_logits: torch.Tensor,
        is_mask_from_pts: bool,
    ) -> torch.Tensor:
        """This frame's memory, B x 64 x 64 x 64, from its raw image features and predicted mask."""
        if self.cfg.binarize_mask_from_pts_for_mem_enc and is_mask_from_pts and not self.training:
            mask = (masks_high_res > 0).float()
        else:
            mask = torch.sigmoid(masks_high_res)
        mask = mask * self.cfg.sigmoid_scale_for_mem_enc + self.cfg.sigmoid_bias_for_mem_enc
        dtype = self.compute_dtype
        features, _ = self.memory_encoder(feats.embed.to(dtype), mask.to(dtype))
        if self.no_obj_embed_spatial is not None:
            absent = (object_score_logits <= 0).float()[..., None, None]  # B x 1 x 1 x 1
            features = features + absent * self.no_obj_embed_spatial[..., None, None]
        return features

    # ------------------------------------------------------------------ one step
    def use_multimask(self, is_init_cond_frame: bool, point_inputs: dict | None) -> bool:
        """Three candidate masks for a single click (or none) - the ambiguous cases."""
        n = 0 if point_inputs is None else point_inputs["point_labels"].shape[1]
        return n <= 1

    def track_step(
        self,
        feats: FrameFeatures,
        frame_idx: int,
        is_init_cond_frame: bool,
        memory: Mapping | None = None,
        num_frames: int = 1,
        point_inputs: dict | None = None,
        mask_inputs: torch.Tensor | None = None,
        reverse: bool = False,
        run_mem_encoder: bool = True,
        prev_mask_logits: torch.Tensor | None = None,
    ) -> dict:
        """Segment a batch of objects on one frame and (optionally) encode the frame's memory.

        ``is_init_cond_frame``: the frame is prompted and the object has no memory to use yet, so the
        features get the learned no-memory embedding instead of memory attention.
        ``prev_mask_logits`` (B x 1 x 256 x 256): previous prediction, fed back with correction clicks.
        """
        if mask_inputs is not None:
            out = self.mask_as_output(feats.embed, feats.high_res, mask_inputs)
        else:
            if is_init_cond_frame:
                pix = feats.embed + self.no_mem_embed.reshape(1, -1, 1, 1)
            else:
                pix = self.condition_on_memory(feats, frame_idx, memory, num_frames, reverse)
            if prev_mask_logits is not None:
                mask_inputs = prev_mask_logits
            multimask = self.use_multimask(is_init_cond_frame, point_inputs)
            out = self.sam_heads(pix, feats.high_res, point_inputs, mask_inputs, multimask)
        out["maskmem_features"] = None
        if run_mem_encoder:
            out["maskmem_features"] = self.encode_memory(
                feats, out["pred_masks_high_res"], out["object_score_logits"], point_inputs is not None
            )
        return out
