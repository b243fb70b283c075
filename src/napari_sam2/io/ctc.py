"""Cell Tracking Challenge (CTC) format: label masks plus a track table.

A CTC result folder holds one 16-bit label image per frame, ``mask000.tif``,
``mask001.tif``, ... (4 digits when there are more than 1000 frames), and
``res_track.txt`` with one line per track, ``L B E P``: label, first frame,
last frame, parent label (0 for none). The ground-truth layout uses the same
conventions with other names (``TRA/man_track000.tif`` + ``TRA/man_track.txt``,
``SEG/man_seg000.tif``).

A label must appear in frame B and frame E and nowhere outside [B, E]; a parent
ends before its daughters begin. A track may not miss a frame inside [B, E]:
the CTC's evaluation (and both py-ctcmetrics and traccuracy) refuse that. A
track that does (a cell SAM2 lost for a few frames and found again) is split
when written: the part after the gap gets a new label whose parent is the part
before it (:func:`split_gaps`), the CTC's own rule for interrupted tracks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tifffile

from .atomic import atomic_path
from .label_frames import iter_frames, labels_for_dtype

Track = tuple[int, int, int, int]  # (label, begin, end, parent)


def numbered_files(folder: Path, prefix: str) -> dict[int, Path]:
    """``{t: path}`` of the CTC-numbered TIFFs ``<prefix><t>.tif`` in ``folder`` (none if it is missing)."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.tiff?$")
    found = {}
    for path in folder.iterdir() if folder.is_dir() else ():
        m = pattern.match(path.name)
        if m:
            found[int(m.group(1))] = path
    return found


def ctc_digits(n_frames: int) -> int:
    """Zero-padding of CTC frame numbers: 3 digits, more once frame numbers need them."""
    return max(3, len(str(max(int(n_frames) - 1, 0))))


class _SpanCounter:
    """First/last frame (and number of frames) in which each label appears, and its runs of consecutive
    frames (frames come in order)."""

    def __init__(self) -> None:
        self.begin: dict[int, int] = {}
        self.end: dict[int, int] = {}
        self.count: dict[int, int] = {}
        self.runs: dict[int, list[list[int]]] = {}
        self.n_frames = 0

    def add(self, t: int, frame: np.ndarray) -> None:
        ids = np.unique(frame)
        for label in ids[ids != 0].tolist():
            self.begin.setdefault(label, t)
            self.end[label] = t
            self.count[label] = self.count.get(label, 0) + 1
            runs = self.runs.setdefault(label, [])
            if runs and runs[-1][1] == t - 1:
                runs[-1][1] = t
            else:
                runs.append([t, t])
        self.n_frames = max(self.n_frames, t + 1)

    def tracks(self) -> list[Track]:
        return [(int(lab), self.begin[lab], self.end[lab], 0) for lab in sorted(self.begin)]


def tracks_from_labels(labels) -> list[Track]:
    """Track table (label, begin, end, parent=0) from label frames.

    Parameters
    ----------
    labels : array (T, Y, X) or iterable of (Y, X) frames
        Label images, 0 = background; numpy, dask or zarr arrays are read frame by frame.

    Returns
    -------
    list of (int, int, int, int)
        One ``(label, begin, end, 0)`` per label, sorted by label; `begin`/`end`
        are the first/last frame index in which the label appears. Parents are
        unknown from masks alone (0); set them from a lineage for divisions.
    """
    spans = _SpanCounter()
    for t, frame in enumerate(iter_frames(labels)[0]):
        spans.add(t, np.asarray(frame))
    return spans.tracks()


def _normalise_tracks(tracks: Iterable[Sequence[int]]) -> list[Track]:
    out = []
    for row in tracks:
        values = tuple(row)
        if len(values) != 4:
            raise ValueError(f"each track must be (label, begin, end, parent), got {row!r}")
        try:
            out.append(tuple(int(v) for v in values))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"track {row!r} must hold four integers") from exc
    return out


def check_tracks(tracks: Iterable[Sequence[int]], spans: _SpanCounter | None = None,
                 n_frames: int | None = None) -> list[Track]:
    """Validate a CTC track table, alone or against the masks it describes.

    Parameters
    ----------
    tracks : iterable of (label, begin, end, parent)
    spans : internal span counter of the masks, optional
    n_frames : int, optional
        Number of frames; `end` must be below it.

    Returns
    -------
    list of (int, int, int, int)
        The tracks as plain int tuples, in the given order.

    Raises
    ------
    ValueError
        Listing every inconsistency found (up to 10): labels <= 0 or
        repeated, begin > end, unknown parent, parent not ending before its
        child begins, and with `spans`: labels in the masks missing from the
        table (or the other way round) and begin/end that differ from the
        first/last frame where the label appears.
    """
    rows = _normalise_tracks(tracks)
    problems: list[str] = []
    by_label: dict[int, Track] = {}
    for row in rows:
        label, begin, end, parent = row
        if label <= 0:
            problems.append(f"track label {label} must be positive (0 is background)")
        if label in by_label:
            problems.append(f"label {label} is listed twice")
        by_label[label] = row
        if begin < 0 or end < begin:
            problems.append(f"label {label}: begin {begin} / end {end} must satisfy 0 <= begin <= end")
        if n_frames is not None and end >= n_frames:
            problems.append(f"label {label}: end {end} is past the last frame {n_frames - 1}")
    for label, begin, _end, parent in rows:
        if parent == 0:
            continue
        if parent not in by_label:
            problems.append(f"label {label}: parent {parent} is not a listed track")
        elif by_label[parent][2] >= begin:
            problems.append(f"label {label} begins at frame {begin} but its parent {parent} "
                            f"ends at frame {by_label[parent][2]}; a parent must end before "
                            "its daughters begin")
    if spans is not None:
        for label in sorted(set(spans.begin) - set(by_label)):
            problems.append(f"label {label} appears in the masks (frames {spans.begin[label]}.."
                            f"{spans.end[label]}) but not in the track table")
        for label in sorted(set(by_label) - set(spans.begin)):
            problems.append(f"label {label} is in the track table but in no mask")
        for label in sorted(set(by_label) & set(spans.begin)):
            _, begin, end, _ = by_label[label]
            if (begin, end) != (spans.begin[label], spans.end[label]):
                problems.append(f"label {label}: track table says frames {begin}..{end} but the "
                                f"masks show it in frames {spans.begin[label]}..{spans.end[label]}")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ValueError("inconsistent CTC tracks: " + "; ".join(problems[:10]) + more
                         + ". Recompute them with tracks_from_labels(...) and set the parents.")
    return rows


def format_tracks(tracks: Iterable[Sequence[int]]) -> str:
    """``res_track.txt`` text: one ``L B E P`` line per track."""
    return "".join(f"{label} {b} {e} {p}\n" for label, b, e, p in _normalise_tracks(tracks))


def read_ctc_tracks(path: str | os.PathLike) -> list[Track]:
    """Read a CTC track file (``res_track.txt`` / ``man_track.txt``) as (label, begin, end, parent) tuples."""
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 4:
            raise ValueError(f"'{path}' line {number}: expected 'L B E P' (4 integers), got {line!r}")
        try:
            rows.append(tuple(int(p) for p in parts))
        except ValueError as exc:
            raise ValueError(f"'{path}' line {number}: expected integers, got {line!r}") from exc
    return rows


def write_ctc_folder(folder: Path, frames, prefix: str, subdir: str = "",
                     spans: _SpanCounter | None = None) -> tuple[_SpanCounter, list[Path]]:
    """Write frames as ``{subdir}/{prefix}NNN.tif`` uint16 into an existing (temporary) folder.

    Frame numbers are padded once the number of frames is known, so frames
    may come from a generator of unknown length.
    """
    spans = spans if spans is not None else _SpanCounter()
    target = folder / subdir if subdir else folder
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for t, frame in enumerate(iter_frames(frames)[0]):
        frame = labels_for_dtype(frame, np.uint16, f"frame {t}",
                                 hint="CTC masks are 16-bit: at most 65535 labels")
        if frame.ndim != 2:
            raise ValueError(f"frame {t} has shape {frame.shape}; CTC masks must be 2D (Y, X)")
        spans.add(t, frame)
        tmp_name = target / f"{prefix}.{t}.unnumbered.tif"
        tifffile.imwrite(tmp_name, frame, compression="zlib")
        written.append(tmp_name)
    if not written:
        raise ValueError("no frames to write: the label frames were empty")
    digits = ctc_digits(len(written))
    final = []
    for t, path in enumerate(written):
        name = target / f"{prefix}{t:0{digits}d}.tif"
        os.replace(path, name)
        final.append(name)
    return spans, final


def split_gaps(files: Sequence[Path], spans: _SpanCounter, tracks: Iterable[Sequence[int]]) -> list[Track]:
    """Split every track that misses frames inside its span, in written CTC frames and in its table.

    ``files``: the frames' TIFFs in order (rewritten where a label changes); ``spans``: what
    :func:`write_ctc_folder` counted (updated); ``tracks``: the table, checked against ``spans``.
    Each part after a gap gets a new label (above every label in use) whose parent is the part
    before; daughters of a split track get its last part as parent. Returns the new table.
    """
    rows = check_tracks(tracks, spans, spans.n_frames)
    gapped = {lab: runs for lab, runs in spans.runs.items() if len(runs) > 1}
    if not gapped:
        return rows
    next_label = max([*spans.begin, *(r[0] for r in rows)]) + 1
    needed = sum(len(r) - 1 for r in gapped.values())
    if next_label + needed - 1 > 65535:
        raise ValueError(f"splitting {len(gapped)} track(s) with gaps needs labels up to {next_label + needed - 1}, "
                         "but CTC masks are 16-bit (at most 65535)")
    last_part: dict[int, int] = {}
    parts: dict[int, list[Track]] = {}
    relabel: dict[int, dict[int, int]] = {}  # frame -> {old label: new label}
    for label in sorted(gapped):
        previous = label
        segs = [(label, gapped[label][0][0], gapped[label][0][1], None)]
        for b, e in gapped[label][1:]:
            segs.append((next_label, b, e, previous))
            for t in range(b, e + 1):
                relabel.setdefault(t, {})[label] = next_label
            spans.begin[next_label], spans.end[next_label] = b, e
            spans.runs[next_label] = [[b, e]]
            previous = next_label
            next_label += 1
        spans.end[label] = gapped[label][0][1]
        spans.runs[label] = [gapped[label][0]]
        parts[label] = segs
        last_part[label] = previous
    for t, mapping in sorted(relabel.items()):
        frame = _lookup(tifffile.imread(files[t]), mapping)
        tmp = files[t].with_suffix(".split.tif")
        tifffile.imwrite(tmp, frame, compression="zlib")
        os.replace(tmp, files[t])
    out: list[Track] = []
    for label, begin, end, parent in rows:
        parent = last_part.get(parent, parent)
        if label not in parts:
            out.append((label, begin, end, parent))
            continue
        for seg_label, b, e, seg_parent in parts[label]:
            out.append((seg_label, b, e, parent if seg_parent is None else seg_parent))
    return check_tracks(out, spans, spans.n_frames)


def _lookup(values: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    out = values.copy()
    for old, new in mapping.items():
        out[values == old] = new
    return out


def write_ctc(dirpath: str | os.PathLike, frames, tracks: Iterable[Sequence[int]] | None = None,
              overwrite: bool = False) -> Path:
    """Write a Cell Tracking Challenge result folder, atomically.

    Parameters
    ----------
    dirpath : path-like
        The result folder to create (e.g. ``"01_RES"``). Written under a
        temporary name next to it and renamed when complete.
    frames : array (T, Y, X) or iterable of (Y, X) label frames
        Label images (0 = background), streamed frame by frame; converted to
        uint16 (an error if a label exceeds 65535 or is negative).
    tracks : iterable of (label, begin, end, parent), optional
        The lineage. Default: `tracks_from_labels` of the frames (no parents).
        Checked against the masks: every label present in both, begin/end
        equal to the first/last frame of each label, parents ending before
        their daughters begin. A label missing from frames inside its span
        is split there (:func:`split_gaps`): ``res_track.txt`` lists the
        parts, the later ones with new labels.
    overwrite : bool
        Replace an existing folder.

    Returns
    -------
    pathlib.Path
        The folder, holding ``mask000.tif``, ``mask001.tif``, ... and ``res_track.txt``.

    Raises
    ------
    ValueError
        If the tracks do not match the masks (nothing is written).
    FileExistsError, OutputWriteError
        If the folder exists (without `overwrite`) or cannot be written.
    """
    with atomic_path(dirpath, overwrite=overwrite, directory=True) as tmp:
        spans, files = write_ctc_folder(tmp, frames, prefix="mask")
        rows = split_gaps(files, spans, spans.tracks() if tracks is None else tracks)
        (tmp / "res_track.txt").write_text(format_tracks(rows))
    return Path(dirpath)
