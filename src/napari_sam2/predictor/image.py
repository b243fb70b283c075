"""Interactive segmentation of single images: the official ``SAM2ImagePredictor`` API, for any dtype.

>>> predictor = ImagePredictor(build_model("sam2.1_hiera_tiny"))
>>> predictor.set_image(image)                      # H x W (grey) or H x W x 3, uint8 / uint16 / float
>>> masks, scores, low_res = predictor.predict(point_coords=[[120, 80]], point_labels=[1])
>>> masks, scores, _ = predictor.predict(box=[50, 40, 200, 180], multimask_output=False)
>>> masks, scores, _ = predictor.predict(point_coords=[[120, 80], [150, 95]], point_labels=[1, 0],
...                                      mask_input=low_res[scores.argmax()][None])

Coordinates are ``(x, y)`` = (column, row) in pixels of the original image, as in the official
predictor (pixel ``(i, j)`` covers ``x in [j, j+1)``, ``y in [i, i+1)``; its centre is
``(j + 0.5, i + 0.5)``). napari gives points as ``(row, col)``: swap them.

The image encoder runs once in :meth:`ImagePredictor.set_image`; each :meth:`ImagePredictor.predict`
only runs the small prompt encoder and mask decoder (milliseconds).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .postprocess import fill_holes_and_sprinkles, resize_logits
from .preprocess import to_model_coords, to_model_input, to_unit_rgb

_VALID_LABELS = (-1, 0, 1, 2, 3)


class ImageNotSetError(RuntimeError, ValueError):
    """Prediction was asked for before an image was set (a RuntimeError, as in the official
    predictor, and a ValueError)."""


class ImagePredictor:
    """Computes an image's embedding once, then predicts masks from clicks, boxes and masks.

    Same API and outputs as ``sam2.sam2_image_predictor.SAM2ImagePredictor`` (sam2 1.1.0), plus:
    images of any dtype (16-bit, float; see :meth:`set_image`), checked prompts with clear errors,
    and hole / sprinkle removal that needs no CUDA extension.

    Parameters
    ----------
    model
        A :class:`napari_sam2.modeling.SAM2` (e.g. from :func:`napari_sam2.build_model`).
    mask_threshold
        Logit threshold turning mask logits into binary masks (default 0.0).
    max_hole_area
        If > 0, background regions of at most this many pixels are filled. Measured on the
        256 x 256 low-resolution masks, as in the official predictor.
    max_sprinkle_area
        If > 0, foreground regions of at most this many (low-resolution) pixels are removed.
    """

    def __init__(
        self,
        model,
        mask_threshold: float = 0.0,
        max_hole_area: float = 0.0,
        max_sprinkle_area: float = 0.0,
        **kwargs,
    ) -> None:
        if kwargs:
            raise TypeError(f"ImagePredictor got unknown parameter(s): {', '.join(sorted(kwargs))}")
        self.model = model
        self.mask_threshold = float(mask_threshold)
        self.max_hole_area = float(max_hole_area)
        self.max_sprinkle_area = float(max_sprinkle_area)
        self.image_size = int(model.image_size)
        self.mask_input_size = tuple(model.sam_prompt_encoder.mask_input_size)
        self.reset_predictor()

    # ------------------------------------------------------------------ state
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def is_image_set(self) -> bool:
        return self._is_image_set

    @property
    def orig_hw(self) -> list[tuple[int, int]] | None:
        """``(height, width)`` of each set image."""
        return None if self._orig_hw is None else list(self._orig_hw)

    def reset_predictor(self) -> None:
        """Forget the current image(s) and their embeddings."""
        self._is_image_set = False
        self._features = None
        self._orig_hw = None
        self._is_batch = False

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def set_image(
        self,
        image,
        intensity_range: tuple[float, float] | None = None,
    ) -> None:
        """Compute the embedding of one image (the expensive step: about a second on a GPU).

        Parameters
        ----------
        image
            ``H x W`` (grey) or ``H x W x 3`` (RGB) array, or a PIL image. uint8 is taken as 0-255
            (exactly as the official predictor); any other dtype (uint16, int, float) is scaled to
            [0, 1] with its 0.5 and 99.5 percentiles; grey is replicated to three channels.
        intensity_range
            ``(low, high)`` to use instead of the percentiles (e.g. one range for a whole stack,
            so that all frames are normalised the same way).
        """
        unit = to_unit_rgb(image, intensity_range=intensity_range)
        self._set_unit_images([unit])

    @torch.no_grad()
    def set_image_batch(
        self,
        image_list: Sequence,
        intensity_range: tuple[float, float] | None = None,
    ) -> None:
        """Compute the embeddings of several images at once; predict with :meth:`predict_batch`.

        Each image is normalised on its own (see :meth:`set_image`) unless ``intensity_range`` is given.
        """
        if isinstance(image_list, np.ndarray) or not isinstance(image_list, (list, tuple)):
            raise TypeError(
                "set_image_batch expects a list of images (H x W or H x W x 3 arrays); "
                "for a single image use set_image."
            )
        if len(image_list) == 0:
            raise ValueError("set_image_batch got an empty list of images")
        units = [to_unit_rgb(img, intensity_range=intensity_range) for img in image_list]
        self._set_unit_images(units)
        self._is_batch = True

    @torch.no_grad()
    def set_unit_image(self, unit: np.ndarray) -> None:
        """Compute the embedding of one image that is already normalised (no intensity scaling).

        Used by the automatic mask generator, which normalises the whole image once and then
        embeds crops of it.

        Parameters
        ----------
        unit
            ``H x W x 3`` float32 image in [0, 1], as returned by
            :func:`~napari_sam2.predictor.preprocess.to_unit_rgb`.
        """
        self._set_unit_images([unit])

    def get_image_features(self) -> dict:
        """The features of the current image(s), to be given back later to :meth:`set_image_features`.

        Returns
        -------
        dict
            ``{"image_embed": B x 256 x 64 x 64, "high_res_feats": [B x 32 x 256 x 256, B x 64 x 128 x 128]}``
            (the decoder's inputs, sizes for a 1024 input; B = 1 after :meth:`set_image`). Not copied.
        """
        self._require_image("get_image_features")
        return self._features

    def set_image_features(self, features: dict, orig_hw: Sequence[tuple[int, int]]) -> None:
        """Use features computed before (e.g. cached) instead of running the image encoder.

        Parameters
        ----------
        features
            As returned by :meth:`get_image_features`.
        orig_hw
            ``(height, width)`` of each image the features are of (as :attr:`orig_hw`); more than
            one: as after :meth:`set_image_batch`.
        """
        if not isinstance(features, dict) or not {"image_embed", "high_res_feats"} <= set(features):
            raise ValueError("features must be a dict with 'image_embed' and 'high_res_feats', from get_image_features()")
        hws = [tuple(int(s) for s in hw) for hw in orig_hw]
        n = features["image_embed"].shape[0]
        if len(hws) != n:
            raise ValueError(f"orig_hw has {len(hws)} sizes but the features are of {n} images")
        self.reset_predictor()
        self._features = features
        self._orig_hw = hws
        self._is_image_set = True
        self._is_batch = n > 1

    def _set_unit_images(self, units: Sequence[np.ndarray]) -> None:
        """Embed float32 ``H x W x 3`` images already in [0, 1] (see :func:`to_unit_rgb`)."""
        self.reset_predictor()
        batch = torch.cat([to_model_input(u, self.image_size, self.device) for u in units], dim=0)
        with torch.no_grad():
            self._features = self._compute_features(batch)
        self._orig_hw = [tuple(int(s) for s in u.shape[:2]) for u in units]
        self._is_image_set = True

    def _compute_features(self, batch: torch.Tensor) -> dict:
        """``B x 3 x S x S`` normalised images -> ``{"image_embed", "high_res_feats"}``.

        The stride-16 map gets the learned no-memory embedding, as in the official image predictor.
        """
        feats = self.model.encode_frame(batch)
        embed = feats.embed + self.model.no_mem_embed.reshape(1, -1, 1, 1)
        # the SAM heads compute in fp32 whatever the encoder's precision
        return {"image_embed": embed.float(), "high_res_feats": [h.float() for h in feats.high_res]}

    def get_image_embedding(self) -> torch.Tensor:
        """The embedding of the current image(s): ``B x 256 x 64 x 64`` (B = 1 after set_image)."""
        self._require_image("get_image_embedding")
        return self._features["image_embed"]

    def _require_image(self, what: str) -> None:
        if not self._is_image_set:
            raise ImageNotSetError(f"An image must be set with .set_image(...) before {what}().")

    # ------------------------------------------------------------------ prediction
    def predict(
        self,
        point_coords=None,
        point_labels=None,
        box=None,
        mask_input=None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for prompts on the current image.

        Parameters
        ----------
        point_coords
            ``N x 2`` clicks ``(x, y)`` in pixels, or ``B x N x 2`` for B objects at once.
        point_labels
            ``N`` (or ``B x N``) labels: 1 foreground click, 0 background click.
        box
            ``(x0, y0, x1, y1)`` in pixels, or ``B x 4`` for B objects at once (each box may be
            combined with its own clicks, ``B x N x 2``).
        mask_input
            Low-resolution logits from a previous call (``1 x 256 x 256``, or ``B x 1 x 256 x 256``):
            refines that mask.
        multimask_output
            Three candidate masks (best for a single, ambiguous click) instead of one.
        return_logits
            Return the mask logits instead of boolean masks.
        normalize_coords
            True (default): coordinates are pixels of the original image. False: they are already
            normalised to [0, 1] (x / width, y / height).

        Returns
        -------
        masks
            ``C x H x W`` at the original resolution (``B x C x H x W`` for B objects), bool or logits;
            C is 3 with ``multimask_output`` else 1.
        iou_predictions
            ``C`` (or ``B x C``) predicted quality of each mask.
        low_res_masks
            ``C x 256 x 256`` (or ``B x C x 256 x 256``) logits, clamped to [-32, 32], for ``mask_input``.
        """
        self._require_image("predict")
        if self._is_batch and len(self._orig_hw) > 1:
            raise RuntimeError("Several images are set (set_image_batch): use predict_batch(...).")
        coords, labels, boxes, mask = self._prep_prompts(
            point_coords, point_labels, box, mask_input, normalize_coords, img_idx=0
        )
        masks, ious, low = self._predict(coords, labels, boxes, mask, multimask_output, return_logits, img_idx=0)
        return _to_numpy(masks.squeeze(0)), _to_numpy(ious.squeeze(0)), _to_numpy(low.squeeze(0))

    def predict_batch(
        self,
        point_coords_batch=None,
        point_labels_batch=None,
        box_batch=None,
        mask_input_batch=None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """:meth:`predict` for each image of :meth:`set_image_batch`: lists (one entry per image) of
        prompts in, lists of ``(masks, iou_predictions, low_res_masks)`` out."""
        self._require_image("predict_batch")
        if not self._is_batch:
            raise RuntimeError("predict_batch needs images set with set_image_batch(...); use predict().")
        n = len(self._orig_hw)
        for name, value in (
            ("point_coords_batch", point_coords_batch),
            ("point_labels_batch", point_labels_batch),
            ("box_batch", box_batch),
            ("mask_input_batch", mask_input_batch),
        ):
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries but {n} images are set")
        out_masks, out_ious, out_low = [], [], []
        for i in range(n):
            coords, labels, boxes, mask = self._prep_prompts(
                *(None if v is None else v[i] for v in (point_coords_batch, point_labels_batch, box_batch, mask_input_batch)),
                normalize_coords, img_idx=i,
            )
            masks, ious, low = self._predict(coords, labels, boxes, mask, multimask_output, return_logits, img_idx=i)
            out_masks.append(_to_numpy(masks.squeeze(0)))
            out_ious.append(_to_numpy(ious.squeeze(0)))
            out_low.append(_to_numpy(low.squeeze(0)))
        return out_masks, out_ious, out_low

    # ------------------------------------------------------------------ prompt checks
    def _prep_prompts(self, point_coords, point_labels, box, mask_input, normalize_coords, img_idx=0):
        """Check the prompts and convert them to network input coordinates.

        Returns ``coords (B x N x 2)``, ``labels (B x N)``, ``boxes (B x 2 x 2)`` (all in the
        S x S network input's pixels, S = 1024) and ``mask (B x 1 x 256 x 256)``; each may be None.
        """
        h, w = self._orig_hw[img_idx]
        unit = "in [0, 1] (normalize_coords=False)" if not normalize_coords else f"inside the {w} x {h} image"
        coords = labels = boxes = mask = None
        if point_coords is None and point_labels is not None:
            raise ValueError("point_labels were given without point_coords")
        if point_coords is not None:
            if point_labels is None:
                raise ValueError(
                    "point_labels must be supplied with point_coords (1 = foreground click, 0 = background click)"
                )
            c = _as_float_array(point_coords, "point_coords")
            lab = np.asarray(point_labels)
            if c.ndim == 2:
                c = c[None]
                lab = lab[None] if lab.ndim == 1 else lab
            if c.ndim != 3 or c.shape[-1] != 2:
                raise ValueError(
                    f"point_coords must have shape N x 2 (x, y) or B x N x 2, got {np.shape(point_coords)}"
                )
            if lab.ndim == 0:
                lab = lab.reshape(1, 1)
            if lab.shape != c.shape[:2]:
                expected = (c.shape[1],) if np.ndim(point_coords) == 2 else c.shape[:2]
                raise ValueError(
                    f"point_labels must have one label per point: expected shape {expected} for "
                    f"point_coords of shape {np.shape(point_coords)}, got {np.shape(point_labels)}"
                )
            if c.shape[1] == 0:
                raise ValueError("point_coords is empty; pass None for no clicks")
            if lab.dtype.kind not in "biu" and not (lab.dtype.kind == "f" and np.all(lab == np.round(lab))):
                raise ValueError(f"point_labels must be integers (1 foreground, 0 background), got {lab.dtype}")
            bad = ~np.isin(lab, _VALID_LABELS)
            if bad.any():
                raise ValueError(
                    f"point_labels must be 1 (foreground) or 0 (background) (or -1 padding, 2 / 3 box corners); "
                    f"got {np.unique(lab[bad]).tolist()}"
                )
            self._check_inside(c, h, w, normalize_coords, "point_coords", unit)
            coords = self._transform_coords(torch.as_tensor(c, dtype=torch.float32, device=self.device), normalize_coords, (h, w))
            labels = torch.as_tensor(lab.astype(np.int32), dtype=torch.int, device=self.device)
        if box is not None:
            b = _as_float_array(box, "box")
            if b.ndim == 1:
                b = b[None]
            if b.ndim == 3 and b.shape[1:] == (1, 4):
                b = b[:, 0]
            if b.ndim != 2 or b.shape[-1] != 4:
                raise ValueError(f"box must be (x0, y0, x1, y1) or B x 4, got shape {np.shape(box)}")
            if np.any(b[:, 2] < b[:, 0]) or np.any(b[:, 3] < b[:, 1]):
                raise ValueError(
                    f"box must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1 (top-left, bottom-right), got {b.tolist()}"
                )
            self._check_inside(b.reshape(-1, 2, 2), h, w, normalize_coords, "box", unit)
            boxes = self._transform_coords(
                torch.as_tensor(b, dtype=torch.float32, device=self.device).reshape(-1, 2, 2), normalize_coords, (h, w)
            )
        if coords is not None and boxes is not None and coords.shape[0] != boxes.shape[0]:
            if coords.shape[0] == 1:
                coords = coords.expand(boxes.shape[0], -1, -1)
                labels = labels.expand(boxes.shape[0], -1)
            elif boxes.shape[0] == 1:
                boxes = boxes.expand(coords.shape[0], -1, -1)
            else:
                raise ValueError(
                    f"{boxes.shape[0]} boxes but {coords.shape[0]} sets of clicks: give one set of clicks per box "
                    "(B x N x 2) or the same clicks for all boxes (N x 2)"
                )
        if mask_input is not None:
            m = _as_float_array(mask_input, "mask_input")
            if m.ndim == 2:
                m = m[None, None]
            elif m.ndim == 3:
                m = m[None]
            if m.ndim != 4 or m.shape[1] != 1 or tuple(m.shape[-2:]) != self.mask_input_size:
                s = self.mask_input_size
                raise ValueError(
                    f"mask_input must be low-resolution logits of shape 1 x {s[0]} x {s[1]} (or B x 1 x {s[0]} x {s[1]}), "
                    f"e.g. low_res_masks[i][None] from a previous predict(); got shape {np.shape(mask_input)}"
                )
            n_prompts = coords.shape[0] if coords is not None else (boxes.shape[0] if boxes is not None else 1)
            if m.shape[0] not in (1, n_prompts):
                raise ValueError(f"mask_input has {m.shape[0]} masks but the prompts are for {n_prompts} objects")
            mask = torch.as_tensor(m, dtype=torch.float32, device=self.device)
        return coords, labels, boxes, mask

    @staticmethod
    def _check_inside(c: np.ndarray, h: int, w: int, normalize_coords: bool, name: str, unit: str) -> None:
        xmax, ymax = (float(w), float(h)) if normalize_coords else (1.0, 1.0)
        x, y = c[..., 0], c[..., 1]
        outside = (x < 0) | (x > xmax) | (y < 0) | (y > ymax)
        if outside.any():
            bad = c[outside][:3].tolist()
            raise ValueError(
                f"{name} must be (x, y) {unit} (0 <= x <= {xmax:g}, 0 <= y <= {ymax:g}); "
                f"{int(outside.sum())} outside, e.g. {bad}. napari points are (row, col): swap them to (x, y)."
            )

    def _transform_coords(self, coords: torch.Tensor, normalize: bool, orig_hw: tuple[int, int]) -> torch.Tensor:
        """(x, y) in original pixels (or [0, 1]) -> network input pixels (S x S)."""
        return to_model_coords(coords, orig_hw if normalize else (1.0, 1.0), self.image_size)

    # ------------------------------------------------------------------ the network
    def decode(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        img_idx: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder and mask decoder on prompts already in network coordinates, no checks
        and no post-processing (the automatic mask generator's inner loop).

        Parameters
        ----------
        point_coords
            ``B x N x 2`` float clicks ``(x, y)`` in pixels of the S x S network input (S =
            :attr:`image_size`; see :func:`~napari_sam2.predictor.preprocess.to_model_coords`), or None.
        point_labels
            ``B x N`` int labels (1 foreground, 0 background, -1 padding), or None.
        boxes
            ``B x 2 x 2`` (or ``B x 4``) box corners in network pixels, or None.
        mask_input
            ``B x 1 x 256 x 256`` low-resolution logits, or None.
        multimask_output
            Three candidate masks per prompt instead of one.
        img_idx
            Which image of :meth:`set_image_batch` (0 after :meth:`set_image`).

        Returns
        -------
        low_res_logits
            ``B x C x 256 x 256`` raw (unclamped) mask logits; C is 3 with ``multimask_output`` else 1.
        iou_predictions
            ``B x C``.
        """
        self._require_image("decode")
        # through _decode, which _predict uses too (and tests replace with a stand-in)
        return self._decode(
            point_coords, point_labels, boxes=boxes, mask_input=mask_input, multimask_output=multimask_output, img_idx=img_idx
        )

    @torch.no_grad()
    def _decode(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        img_idx: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder on transformed prompts -> raw low-res logits ``B x C x 256 x 256``
        and IoU predictions ``B x C``.

        Box corners go in as points labelled 2 and 3, before the clicks (as in the official predictor).
        """
        points = None if point_coords is None else (point_coords, point_labels)
        if boxes is not None:
            box_coords = boxes.reshape(-1, 2, 2)
            box_labels = torch.tensor([[2, 3]], dtype=torch.int, device=box_coords.device).repeat(box_coords.shape[0], 1)
            if points is not None:
                points = (torch.cat([box_coords, points[0]], dim=1), torch.cat([box_labels, points[1]], dim=1))
            else:
                points = (box_coords, box_labels)
        pe = self.model.sam_prompt_encoder
        sparse, dense = pe(points=points, boxes=None, masks=mask_input)
        batched = points is not None and points[0].shape[0] > 1
        high_res = [f[img_idx].unsqueeze(0) for f in self._features["high_res_feats"]]
        low, ious, _, _ = self.model.sam_mask_decoder(
            image_embeddings=self._features["image_embed"][img_idx].unsqueeze(0),
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=batched,
            high_res_features=high_res,
        )
        return low, ious

    def _postprocess(self, low_res: torch.Tensor, orig_hw: tuple[int, int]) -> torch.Tensor:
        """Hole / sprinkle removal on the low-res logits, then bilinear upsampling to ``orig_hw``."""
        masks = fill_holes_and_sprinkles(low_res.float(), self.mask_threshold, self.max_hole_area, self.max_sprinkle_area)
        return resize_logits(masks.float(), orig_hw)

    @torch.no_grad()
    def _predict(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        img_idx: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Torch-level prediction on transformed prompts (as the official ``_predict``): masks
        ``B x C x H x W`` (bool or logits), IoU ``B x C``, low-res logits clamped to [-32, 32]."""
        self._require_image("predict")
        low, ious = self._decode(point_coords, point_labels, boxes, mask_input, multimask_output, img_idx)
        masks = self._postprocess(low, self._orig_hw[img_idx])
        low = torch.clamp(low, -32.0, 32.0)
        if not return_logits:
            masks = masks > self.mask_threshold
        return masks, ious, low


def _as_float_array(value, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric, got {type(value).__name__}: {e}") from None
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bool:
        return t.detach().cpu().numpy()
    return t.detach().float().cpu().numpy()
