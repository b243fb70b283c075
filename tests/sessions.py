"""The video sessions run through the reference and through ours, side by side (parity tests, the bf16
accuracy test and benchmarks/gpu_check.py): the video, the calls, and how the outputs are compared."""

from __future__ import annotations

import numpy as np


def blob_video(T=8, H=96, W=128, seed=0) -> np.ndarray:
    """8-bit RGB frames with three moving blobs."""
    yy, xx = np.mgrid[:H, :W]
    rng = np.random.default_rng(seed)
    vid = np.zeros((T, H, W, 3), np.uint8)
    for t in range(T):
        img = 30 + 10 * rng.random((H, W))
        for cy, cx, r in [(30 + 2 * t, 40 + 3 * t, 12), (60, 90 - 2 * t, 10), (70 - t, 30, 8)]:
            img += 150 * ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
        vid[t] = np.clip(np.stack([img, img * 0.8, img * 0.6], -1), 0, 255).astype(np.uint8)
    return vid


class SideBySide:
    """Runs the same calls on the reference and on ours; ``compare(a, b)`` judges each pair of outputs
    ``(frame_idx, obj_ids, masks)``."""

    def __init__(self, ref, ref_state, ours, our_state):
        self.ref, self.rs, self.ours, self.os = ref, ref_state, ours, our_state

    def compare(self, a, b) -> None:
        raise NotImplementedError

    def call(self, method, *args, **kwargs):
        a = getattr(self.ref, method)(self.rs, *args, **kwargs)
        b = getattr(self.ours, method)(self.os, *args, **kwargs)
        self.compare(a, b)
        return b

    def propagate(self, **kwargs):
        ra = list(self.ref.propagate_in_video(self.rs, **kwargs))
        ob = list(self.ours.propagate_in_video(self.os, **kwargs))
        assert [x[0] for x in ra] == [x[0] for x in ob]
        for a, b in zip(ra, ob):
            self.compare(a, b)
        return ob


def full_session(s: SideBySide, H: int, W: int) -> None:
    """3 objects; clicks with negatives on two frames, a box, a mask on a later frame; forward
    propagation; a refinement click and re-propagation; reverse propagation from a middle frame;
    an object removed and propagation again (8 frames of :func:`blob_video`)."""
    s.call("add_new_points_or_box", frame_idx=0, obj_id=1, points=[[40, 30]], labels=[1])
    s.call("add_new_points_or_box", frame_idx=0, obj_id=1, points=[[60, 40]], labels=[0], clear_old_points=False)
    s.call("add_new_points_or_box", frame_idx=0, obj_id=2, box=[80, 50, 100, 70])
    s.call("add_new_points_or_box", frame_idx=2, obj_id=3, points=[[30, 68], [50, 20]], labels=[1, 0])
    mask = np.zeros((H, W), bool)
    mask[40:70, 70:100] = True
    s.call("add_new_mask", frame_idx=5, obj_id=2, mask=mask)
    out = s.propagate()
    assert [t for t, _, _ in out] == list(range(8))
    s.call("add_new_points_or_box", frame_idx=4, obj_id=1, points=[[52, 38]], labels=[1])
    s.propagate()
    rev = s.propagate(start_frame_idx=4, reverse=True)
    assert [t for t, _, _ in rev] == [4, 3, 2, 1, 0]
    ids_ref, _ = s.ref.remove_object(s.rs, 3)
    ids_ours, _ = s.ours.remove_object(s.os, 3)
    assert list(ids_ref) == list(ids_ours) == [1, 2]
    s.propagate()


class LogitParity(SideBySide):
    """Logits within ``tol`` and the same sign wherever the reference is sure (|logit| > 0.01)."""

    def __init__(self, *args, tol: float):
        super().__init__(*args)
        self.tol = tol
        self.worst = 0.0
        self.compared = 0
        self.pixels = 0

    def compare(self, a, b):
        ta, ids_a, ma = a
        tb, ids_b, mb = b
        assert ta == tb
        assert list(ids_a) == list(ids_b)
        assert ma.shape == mb.shape
        ma, mb = ma.float().cpu(), mb.float().cpu()
        diff = (ma - mb).abs().max().item()
        self.worst = max(self.worst, diff)
        confident = ma.abs() > 0.01
        disagree = ((ma > 0) != (mb > 0)) & confident
        assert int(disagree.sum()) == 0, f"frame {ta}: {int(disagree.sum())} pixels disagree in sign"
        assert diff <= self.tol, f"frame {ta}: max |logit difference| {diff:.3e} > {self.tol}"
        self.compared += 1
        self.pixels += int(confident.sum())


class MaskAgreement(SideBySide):
    """Mask IoU >= ``min_iou`` per object and frame; sign agreement counted where |logit| > 0.1."""

    def __init__(self, *args, min_iou: float):
        super().__init__(*args)
        self.min_iou = min_iou
        self.ious: list[float] = []
        self.agree = 0
        self.sure = 0

    def compare(self, a, b):
        ta, ids_a, ma = a
        tb, ids_b, mb = b
        assert ta == tb and list(ids_a) == list(ids_b)
        ma, mb = ma.float().cpu(), mb.float().cpu()
        for i, obj in enumerate(ids_a):
            fa, fb = ma[i] > 0, mb[i] > 0
            union = int((fa | fb).sum())
            iou = 1.0 if union == 0 else int((fa & fb).sum()) / union
            self.ious.append(iou)
            assert iou >= self.min_iou, f"frame {ta}, object {obj}: mask IoU {iou:.4f} < {self.min_iou} against fp32"
        sure = ma.abs() > 0.1
        self.sure += int(sure.sum())
        self.agree += int(((ma > 0) == (mb > 0))[sure].sum())

    @property
    def sign_agreement(self) -> float:
        return self.agree / max(self.sure, 1)
