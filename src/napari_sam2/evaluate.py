"""Score a Cell Tracking Challenge result folder against ground truth: DET, TRA (and SEG).

DET and TRA are computed with `traccuracy <https://github.com/live-image-tracking-tools/traccuracy>`_
(``CTCMatcher`` + ``CTCMetrics``: the AOGM-based measures of the CTC). SEG (mean Jaccard index of
the ground-truth objects, a reference object matching a result object that covers more than half
of it, 0 otherwise) is computed here, on the frames that have a ``SEG/man_segNNN.tif``.

>>> scores = evaluate_ctc("01_RES", "01_GT")   # doctest: +SKIP
>>> scores["TRA"], scores["DET"], scores.get("SEG")   # doctest: +SKIP

Layouts::

    RESULT_DIR/mask000.tif ... + res_track.txt
    GT_DIR/TRA/man_track000.tif ... + man_track.txt   (required)
    GT_DIR/SEG/man_seg000.tif ...                     (optional; may cover a subset of frames)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tifffile

from .io.ctc import numbered_files

__all__ = ["evaluate_ctc", "seg_score", "CTCLayoutError"]


class CTCLayoutError(ValueError):
    """A folder is not in the Cell Tracking Challenge layout, or result and ground truth disagree."""




def _frames(folder: Path, prefix: str, what: str) -> dict[int, Path]:
    frames = numbered_files(folder, prefix)
    if not frames:
        raise CTCLayoutError(f"{what} '{folder}' holds no {prefix}NNN.tif frames: not a Cell Tracking Challenge folder")
    numbers = sorted(frames)
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))[:5]
        raise CTCLayoutError(f"{what} '{folder}': frames {prefix}NNN.tif are not numbered 0..{numbers[-1]} "
                             f"without gaps (missing e.g. {missing})")
    return frames


def _check_layout(result_dir: Path, gt_dir: Path) -> tuple[dict, dict, Path, Path, dict]:
    if not result_dir.is_dir():
        raise CTCLayoutError(f"result folder '{result_dir}' does not exist")
    if not gt_dir.is_dir():
        raise CTCLayoutError(f"ground-truth folder '{gt_dir}' does not exist")
    res_track = result_dir / "res_track.txt"
    if not res_track.is_file():
        raise CTCLayoutError(f"result folder '{result_dir}' has no res_track.txt: not a CTC result folder "
                             "(mask000.tif..., res_track.txt)")
    res_frames = _frames(result_dir, "mask", "result folder")
    tra = gt_dir / "TRA"
    man_track = tra / "man_track.txt"
    if not tra.is_dir() or not man_track.is_file():
        raise CTCLayoutError(f"ground-truth folder '{gt_dir}' is not in the CTC layout: expected "
                             f"TRA/man_track000.tif... and TRA/man_track.txt (and optionally SEG/man_seg000.tif...)")
    gt_frames = _frames(tra, "man_track", "ground-truth folder")
    if len(res_frames) != len(gt_frames):
        raise CTCLayoutError(f"the result has {len(res_frames)} frames but the ground truth has {len(gt_frames)}: "
                             "they must describe the same movie")
    seg = numbered_files(gt_dir / "SEG", "man_seg")
    for t in seg:
        if t not in res_frames:
            raise CTCLayoutError(f"ground truth SEG/man_seg{t:03d}.tif is beyond the result's last frame "
                                 f"{len(res_frames) - 1}")
    a = tifffile.imread(res_frames[0])
    b = tifffile.imread(gt_frames[0])
    if a.shape != b.shape:
        raise CTCLayoutError(f"result frames have shape {a.shape} but ground-truth frames {b.shape}")
    return res_frames, gt_frames, res_track, man_track, seg


def seg_score(result_frames: dict[int, Path], seg_frames: dict[int, Path]) -> float:
    """CTC SEG: mean Jaccard index over the ground-truth objects of the annotated frames."""
    jaccards = []
    for t, path in sorted(seg_frames.items()):
        gt = tifffile.imread(path)
        res = tifffile.imread(result_frames[t])
        if gt.shape != res.shape:
            raise CTCLayoutError(f"SEG/{path.name} has shape {gt.shape} but the result frame {res.shape}")
        for label in np.unique(gt):
            if label == 0:
                continue
            g = gt == label
            size = int(g.sum())
            ids, counts = np.unique(res[g], return_counts=True)
            j = 0.0
            for rid, c in zip(ids.tolist(), counts.tolist()):
                if rid != 0 and c > 0.5 * size:
                    r = res == rid
                    j = c / float(np.logical_or(g, r).sum())
                    break
            jaccards.append(j)
    return float(np.mean(jaccards)) if jaccards else float("nan")


def evaluate_ctc(result_dir: str | os.PathLike, gt_dir: str | os.PathLike) -> dict:
    """DET, TRA (traccuracy) and SEG (when the ground truth has ``SEG/``) of a CTC result folder.

    Returns
    -------
    dict
        ``{"DET": float, "TRA": float, "LNK": float, "SEG": float}`` (``SEG`` only with ``GT_DIR/SEG``).

    Raises
    ------
    CTCLayoutError (a ValueError)
        A folder not in the CTC layout, frame counts or frame shapes that disagree, inconsistent tracks.
    ImportError
        traccuracy is not installed.
    """
    result_dir, gt_dir = Path(result_dir), Path(gt_dir)
    res_frames, _, res_track, man_track, seg = _check_layout(result_dir, gt_dir)
    try:
        from traccuracy import run_metrics
        from traccuracy.loaders import load_ctc_data
        from traccuracy.matchers import CTCMatcher
        from traccuracy.metrics import CTCMetrics
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("evaluation needs traccuracy: pip install traccuracy") from exc

    import logging

    loaded = {}
    for key, folder, track in (("gt", gt_dir / "TRA", man_track), ("res", result_dir, res_track)):
        try:
            loaded[key] = _quiet(lambda f=folder, tr=track, k=key: load_ctc_data(str(f), track_path=str(tr), name=k))
        except (ValueError, KeyError, AssertionError) as exc:
            raise CTCLayoutError(f"'{track}' does not match the masks of '{folder}': {exc}") from exc
    logging.getLogger("traccuracy").setLevel(logging.WARNING)
    results, _ = _quiet(lambda: run_metrics(gt_data=loaded["gt"], pred_data=loaded["res"], matcher=CTCMatcher(),
                                            metrics=[CTCMetrics()]))
    values = results[0]["results"]
    out = {"DET": float(values["DET"]), "TRA": float(values["TRA"]), "LNK": float(values["LNK"])}
    if seg:
        out["SEG"] = seg_score(res_frames, seg)
    return out


def _quiet(fn):
    """Run ``fn`` without traccuracy's tqdm bars on stderr."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        return fn()
