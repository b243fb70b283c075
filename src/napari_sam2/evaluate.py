"""Score a Cell Tracking Challenge result folder against ground truth with the field's libraries.

`py-ctcmetrics <https://github.com/CellTrackingChallenge/py-ctcmetrics>`_, the Cell Tracking
Challenge's own Python implementation, computes the CTC measures: the technical ones SEG, DET, TRA,
LNK, the biological ones CT, TF, BC(i), CCA, BIO(i), the overall OP_CSB, OP_CTB, OP_CLB(i), and
CHOTA. `traccuracy <https://github.com/live-image-tracking-tools/traccuracy>`_ reads the folders
(its checks name the label and frame of an inconsistent track) and computes the division F1
(DIV_F1). Nothing is scored here by hand.

>>> scores = evaluate_ctc("01_RES", "01_GT")   # doctest: +SKIP
>>> scores["TRA"], scores.get("SEG"), scores.absent   # doctest: +SKIP

Layouts::

    RESULT_DIR/mask000.tif ... + res_track.txt
    GT_DIR/TRA/man_track000.tif ... + man_track.txt   (required: every measure but SEG)
    GT_DIR/SEG/man_seg000.tif ...                     (optional, may cover some frames: SEG, OP_CSB, OP_CTB)
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from pathlib import Path

import tifffile

from .io.ctc import numbered_files

__all__ = ["evaluate_ctc", "CTCScores", "CTCLayoutError", "MEASURES", "LIBRARY"]

#: Every measure evaluate_ctc reports, in the order of the CLI's table.
MEASURES = ("SEG", "DET", "TRA", "LNK", "CT", "TF", "BC", "CCA", "BIO",
            "OP_CSB", "OP_CTB", "OP_CLB", "CHOTA", "DIV_F1")
#: The library that computes each measure.
LIBRARY = {m: "py-ctcmetrics" for m in MEASURES} | {"DIV_F1": "traccuracy"}
_NEEDS_SEG = ("SEG", "OP_CSB", "OP_CTB")
# ctc_evaluate's --bc default: BC(i), BIO(i) and OP_CLB(i) are reported for this i unless asked otherwise
DEFAULT_BC_I = 0


class CTCLayoutError(ValueError):
    """A folder is not in the Cell Tracking Challenge layout, or result and ground truth disagree."""


class CTCScores(dict):
    """``{measure: value}`` of the measures that could be computed.

    Attributes
    ----------
    absent : dict
        ``{measure: why it could not be computed}`` for the others (never scored 0).
    library : dict
        ``{measure: library}`` that computed (or would compute) each measure.
    bc_i : int
        The tolerance i (frames) of BC(i), BIO(i), OP_CLB(i) and of DIV_F1's frame buffer.
    """

    def __init__(self, values: dict, absent: dict, bc_i: int):
        super().__init__(values)
        self.absent = absent
        self.library = dict(LIBRARY)
        self.bc_i = bc_i


def _frames(folder: Path, prefix: str, what: str) -> dict[int, Path]:
    frames = numbered_files(folder, prefix)
    if not frames:
        raise CTCLayoutError(f"{what} '{folder}' holds no {prefix}NNN.tif frames: not a Cell Tracking Challenge folder")
    numbers = sorted(frames)
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))[:5]
        raise CTCLayoutError(f"{what} '{folder}': frames {prefix}NNN.tif are not numbered 0..{numbers[-1]} "
                             f"without gaps (missing e.g. {missing})")
    _check_names(frames, folder, what)
    return frames


def _check_names(frames: dict[int, Path], folder: Path, what: str) -> None:
    # py-ctcmetrics lists "*.tif" and orders frames by sorting the names: other suffixes would be
    # skipped and mixed zero-padding (mask999, mask1000) put out of order, scoring the wrong frames
    bad = [p.name for p in frames.values() if p.suffix != ".tif"]
    if bad:
        raise CTCLayoutError(f"{what} '{folder}': {bad[0]} must be named .tif (the CTC's and py-ctcmetrics' suffix)")
    if len({len(p.stem) for p in frames.values()}) > 1:
        raise CTCLayoutError(f"{what} '{folder}': frame numbers are not all padded to the same number of digits")


def _shape(path: Path) -> tuple[int, ...]:
    with tifffile.TiffFile(path) as tif:  # the header only: shapes of long movies are checked cheaply
        return tuple(tif.series[0].shape)


def _check_shapes(frames: dict[int, Path], reference: tuple[int, ...], folder: Path, what: str,
                  result_dir: Path) -> None:
    for _, path in sorted(frames.items()):
        shape = _shape(path)
        if shape != reference:
            raise CTCLayoutError(f"{what} '{folder}' frame {path.name} has shape {shape} but the result "
                                 f"'{result_dir}' frames have shape {reference}: they must describe the same movie")


def _check_layout(result_dir: Path, gt_dir: Path) -> dict[int, Path]:
    if not result_dir.is_dir():
        raise CTCLayoutError(f"result folder '{result_dir}' does not exist")
    if not gt_dir.is_dir():
        raise CTCLayoutError(f"ground-truth folder '{gt_dir}' does not exist")
    if not (result_dir / "res_track.txt").is_file():
        raise CTCLayoutError(f"result folder '{result_dir}' has no res_track.txt: not a CTC result folder "
                             "(mask000.tif..., res_track.txt)")
    if not (result_dir / "res_track.txt").read_text().strip():
        # a result without cells is not scored 0 by the libraries: py-ctcmetrics calls it invalid
        raise CTCLayoutError(f"the result '{result_dir}' has no cells (res_track.txt is empty): py-ctcmetrics "
                             "rejects an empty result, there is nothing to score")
    res_frames = _frames(result_dir, "mask", "result folder")
    tra = gt_dir / "TRA"
    if not tra.is_dir() or not (tra / "man_track.txt").is_file():
        raise CTCLayoutError(f"ground-truth folder '{gt_dir}' is not in the CTC layout: expected "
                             f"TRA/man_track000.tif... and TRA/man_track.txt (and optionally SEG/man_seg000.tif...)")
    gt_frames = _frames(tra, "man_track", "ground-truth folder")
    if len(res_frames) != len(gt_frames):
        raise CTCLayoutError(f"the result '{result_dir}' has {len(res_frames)} frames but the ground truth "
                             f"'{gt_dir}' has {len(gt_frames)}: they must describe the same movie")
    if len(gt_frames) < 2:
        # py-ctcmetrics builds the reference's links with no guard and fails on a movie without any
        raise CTCLayoutError(f"the ground truth '{gt_dir}' has a single frame: the CTC measures (py-ctcmetrics) "
                             "need a movie of two frames or more")
    seg = numbered_files(gt_dir / "SEG", "man_seg")
    for t in seg:
        if t not in res_frames:
            raise CTCLayoutError(f"ground truth '{gt_dir}' SEG/man_seg{t:03d}.tif is beyond the last frame "
                                 f"{len(res_frames) - 1} of the result '{result_dir}'")
    if seg:
        _check_names(seg, gt_dir / "SEG", "ground-truth folder")
    reference = _shape(res_frames[0])
    _check_shapes(res_frames, reference, result_dir, "result", result_dir)
    _check_shapes(gt_frames, reference, tra, "ground truth", result_dir)
    _check_shapes(seg, reference, gt_dir / "SEG", "ground truth", result_dir)
    return seg


def evaluate_ctc(result_dir: str | os.PathLike, gt_dir: str | os.PathLike, *, bc_i: int = DEFAULT_BC_I,
                 threads: int = 1) -> CTCScores:
    """The Cell Tracking Challenge measures of a CTC result folder.

    Parameters
    ----------
    result_dir : path-like
        A CTC result folder (``mask000.tif ...`` and ``res_track.txt``), or a GEFF (``NAME.geff``,
        the labels beside it) or OME-Zarr labels (``NAME.ome.zarr`` with ``NAME.tracks.csv``), which
        are converted to a CTC folder in a temporary place first.
    gt_dir : path-like
        ``TRA/man_track000.tif ...``, ``TRA/man_track.txt`` and optionally ``SEG/man_seg000.tif ...``.
    bc_i : int
        Tolerance i in frames of BC(i) (and so of BIO(i), OP_CLB(i)) and DIV_F1's frame buffer;
        default 0, ``ctc_evaluate --bc``'s default.
    threads : int
        Processes py-ctcmetrics matches frames with (0: one per CPU).

    Returns
    -------
    CTCScores
        A dict ``{measure: float}`` of the measures of :data:`MEASURES` that could be computed, with
        ``.absent`` = ``{measure: reason}`` for the others: SEG, OP_CSB and OP_CTB need
        ``GT_DIR/SEG``; BC and DIV_F1 a ground truth with divisions; CCA a complete cell cycle
        (a ground-truth track that begins and ends with a division). BIO is py-ctcmetrics' mean of
        those of CT, TF, BC, CCA that are defined.

    Raises
    ------
    CTCLayoutError (a ValueError)
        A folder not in the CTC layout, frame counts or frame shapes that disagree, tracks that do
        not match their masks (naming the label and frame).
    ImportError
        py-ctcmetrics or traccuracy is not installed.
    """
    result_dir, gt_dir = Path(result_dir), Path(gt_dir)
    if int(bc_i) < 0:
        raise ValueError(f"bc_i must be >= 0 frames, got {bc_i}")
    if result_dir.name.lower().endswith((".geff", ".zarr")):
        return _evaluate_converted(result_dir, gt_dir, bc_i, threads)
    seg = _check_layout(result_dir, gt_dir)
    graphs = _load_graphs(result_dir, gt_dir)
    values, absent = _ctc_measures(result_dir, gt_dir, bool(seg), int(bc_i), threads)
    div_f1, why = _division_f1(graphs, int(bc_i))
    if why:
        absent["DIV_F1"] = why
    else:
        values["DIV_F1"] = div_f1
    for key in [k for k, v in values.items() if v is None or math.isnan(v)]:
        del values[key]
        absent.setdefault(key, "the library returned no value")
    return CTCScores({m: values[m] for m in MEASURES if m in values},
                     {m: absent[m] for m in MEASURES if m in absent}, int(bc_i))


def _evaluate_converted(result: Path, gt_dir: Path, bc_i: int, threads: int) -> CTCScores:
    """Score a GEFF or OME-Zarr (+ tracks CSV) result: converted to a CTC folder in a temporary place
    first, as the libraries read CTC folders (tracks with gaps are split there, as the CTC requires)."""
    import tempfile

    from .convert import ConvertError, convert

    if not gt_dir.is_dir():
        raise CTCLayoutError(f"ground-truth folder '{gt_dir}' does not exist")
    with tempfile.TemporaryDirectory(prefix="napari-sam2-evaluate-") as tmp:
        folder = Path(tmp) / "RES"
        try:
            convert(result, folder)
        except (ConvertError, FileNotFoundError) as exc:
            raise CTCLayoutError(f"cannot evaluate '{result}': {exc}") from exc
        try:
            return evaluate_ctc(folder, gt_dir, bc_i=bc_i, threads=threads)
        except CTCLayoutError as exc:
            raise CTCLayoutError(str(exc).replace(str(folder), f"{result} (as CTC)")) from exc


def _load_graphs(result_dir: Path, gt_dir: Path) -> dict:
    try:
        from traccuracy.loaders import load_ctc_data
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("evaluation needs traccuracy: pip install traccuracy") from exc
    logging.getLogger("traccuracy").setLevel(logging.WARNING)
    loaded = {}
    for key, folder, track in (("gt", gt_dir / "TRA", gt_dir / "TRA" / "man_track.txt"),
                               ("res", result_dir, result_dir / "res_track.txt")):
        try:
            loaded[key] = _quiet(lambda f=folder, tr=track, k=key: load_ctc_data(str(f), track_path=str(tr), name=k))
        except (ValueError, KeyError, AssertionError) as exc:
            # traccuracy's checks say which label is missing in which frame ("Missing IDs in masks at t=3: {1}")
            raise CTCLayoutError(f"'{track}' does not match the masks of '{folder}': {exc}") from exc
    return loaded


def _ctc_measures(result_dir: Path, gt_dir: Path, with_seg: bool, bc_i: int,
                  threads: int) -> tuple[dict, dict]:
    try:
        from ctc_metrics.scripts.evaluate import calculate_metrics, load_data
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("evaluation needs py-ctcmetrics: pip install py-ctcmetrics") from exc
    # "Valid" makes calculate_metrics report its validity check; "BC(i)" sets the largest i it computes
    names = ["Valid", "DET", "TRA", "LNK", "CT", "TF", "BC", f"BC({bc_i})", "CCA", "BIO", "OP_CLB", "CHOTA"]
    if with_seg:
        names += ["SEG", "OP_CSB", "OP_CTB"]
    # load_data / calculate_metrics print progress on stdout (which carries --json) and report an
    # invalid result only as warnings: both are captured, the warnings become the error message
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        comp, ref, traj, segm, _, is_valid = load_data(str(result_dir), str(gt_dir), True, with_seg, threads)
        raw = calculate_metrics(comp, ref, traj, segm, names, is_valid)
    if not raw.get("Valid"):
        why = "; ".join(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)))
        raise CTCLayoutError(f"py-ctcmetrics finds the result '{result_dir}' invalid: {why or 'no reason given'}")
    source = {m: m for m in MEASURES} | {"BC": f"BC({bc_i})", "BIO": f"BIO({bc_i})", "OP_CLB": f"OP_CLB({bc_i})"}
    values, absent = {}, {}
    for m in MEASURES:
        if m == "DIV_F1":
            continue
        if m in _NEEDS_SEG and not with_seg:
            absent[m] = f"needs segmentation ground truth: '{gt_dir}' has no SEG/man_segNNN.tif"
            continue
        value = raw.get(source[m])
        if value is None:
            absent[m] = _why_undefined(m)
        else:
            values[m] = float(value)
    return values, absent


def _why_undefined(measure: str) -> str:
    if measure == "BC":
        return "the ground truth has no division"
    if measure == "CCA":
        return "the ground truth has no complete cell cycle (a track that begins and ends with a division)"
    return "py-ctcmetrics returned no value"


def _division_f1(graphs: dict, bc_i: int) -> tuple[float | None, str | None]:
    from traccuracy.matchers import CTCMatcher
    from traccuracy.metrics import DivisionMetrics

    matched = _quiet(lambda: CTCMatcher().compute_mapping(graphs["gt"], graphs["res"]))
    if matched.matching_type != "one-to-one":
        # traccuracy's division metrics refuse a result object matched to several reference cells
        return None, (f"traccuracy's division metrics need a one-to-one matching; this result's is "
                      f"{matched.matching_type} (a result object covers several ground-truth cells)")
    if not graphs["gt"].get_divisions():
        return None, "the ground truth has no division"
    results = _quiet(lambda: DivisionMetrics(max_frame_buffer=bc_i).compute(matched).to_dict())
    return float(results["results"][f"Frame Buffer {bc_i}"]["Division F1"]), None


def _quiet(fn):
    """Run ``fn`` without traccuracy's tqdm bars on stderr."""
    with contextlib.redirect_stderr(io.StringIO()):
        return fn()
