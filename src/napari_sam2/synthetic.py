"""Synthetic fluorescence time-lapses with ground truth, for tests, demos and evaluation.

`make_timelapse` simulates elliptical cells that drift and jitter, some of
which divide, and optionally one that enters from the border half-way. It
returns the noisy image, the ground-truth labels (one stable id per track) and
the lineage in Cell Tracking Challenge convention; `SyntheticTimelapse.clicks`
places one click on every cell of a frame. `write_ctc_ground_truth`
writes the ground truth in the CTC layout (``TRA/``, ``SEG/``).

The image model: a camera offset, cells with a few thousand counts and a
brighter centre, optical blur (Gaussian PSF), Poisson shot noise and a little
Gaussian read noise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage

__all__ = ["SyntheticTimelapse", "make_timelapse", "write_ctc_ground_truth", "write_ctc_images"]

BACKGROUND = 100.0  # camera offset, counts
READ_NOISE = 3.0  # counts (standard deviation)
PSF_SIGMA = 1.2  # pixels


@dataclass
class SyntheticTimelapse:
    """A simulated time-lapse and its ground truth.

    Attributes
    ----------
    image : numpy.ndarray, (T, Y, X)
        Noisy fluorescence image (default uint16).
    labels : numpy.ndarray, (T, Y, X) uint16
        Ground-truth masks, 0 = background; a label is one track (one cell
        from its birth or entry to its division or the end of the movie).
    lineage : list of (label, begin, end, parent)
        CTC convention: `begin`/`end` are the first/last frame where the label
        appears, `parent` the label of the mother cell (0 for none). Daughters
        begin at their parent's ``end + 1``.
    positions : pandas.DataFrame
        True centres, columns ``frame, label, y, x``.
    seed : int
        The seed that generated it.
    """

    image: np.ndarray
    labels: np.ndarray
    lineage: list[tuple[int, int, int, int]]
    positions: pd.DataFrame = field(repr=False)
    seed: int = 0

    @property
    def n_frames(self) -> int:
        """Number of frames T."""
        return int(self.image.shape[0])

    @property
    def divisions(self) -> list[tuple[int, tuple[int, ...], int]]:
        """``(parent, daughters, frame)`` per division; `frame` is where the daughters begin."""
        children: dict[int, list[int]] = {}
        begins = {lab: b for lab, b, _, _ in self.lineage}
        for lab, _, _, parent in self.lineage:
            if parent:
                children.setdefault(parent, []).append(lab)
        return [(p, tuple(sorted(d)), begins[min(d)]) for p, d in sorted(children.items())]

    def lineage_table(self) -> pd.DataFrame:
        """The lineage as a DataFrame with columns ``label, begin, end, parent``."""
        return pd.DataFrame(self.lineage, columns=["label", "begin", "end", "parent"])

    def clicks(self, frame: int = 0, labels: Iterable[int] | None = None) -> pd.DataFrame:
        """One click per ground-truth cell on `frame`, as a user would place it in napari.

        Each click is the cell's pixel nearest the centroid of its mask, so it always lies on the
        cell (a true centre in `positions` may be hidden by a neighbour or lie past the border).

        Parameters
        ----------
        frame : int
            The frame to click on.
        labels : iterable of int, optional
            The cells to click, in this order (default: every cell drawn on `frame`, by label).

        Returns
        -------
        pandas.DataFrame
            Columns ``t, y, x, obj_id`` (napari's order, integers; ``obj_id`` is the cell's label),
            one row per cell: a valid ``points`` table for :func:`napari_sam2.segment_stack`.
        """
        if not 0 <= frame < self.n_frames:
            raise IndexError(f"frame {frame} is out of range: the time-lapse has {self.n_frames} frames")
        gt = self.labels[frame]
        present = np.unique(gt)
        present = present[present != 0]
        wanted = present.tolist() if labels is None else [int(lab) for lab in labels]
        missing = sorted(set(wanted) - set(present.tolist()))
        if missing:
            raise ValueError(f"label(s) {missing} are not on frame {frame}, which has {present.tolist()}")
        rows = []
        for label in wanted:
            ys, xs = np.nonzero(gt == label)
            k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
            rows.append((frame, int(ys[k]), int(xs[k]), label))
        return pd.DataFrame(rows, columns=["t", "y", "x", "obj_id"], dtype=np.int64)


@dataclass
class Cell:
    label: int
    y: float
    x: float
    a: float  # semi-major axis (px)
    b: float  # semi-minor axis (px)
    theta: float  # orientation (rad)
    vy: float
    vx: float
    brightness: float
    parent: int = 0
    target_a: float = 0.0
    target_b: float = 0.0
    entering: bool = False
    divides_at: int | None = None

    def __post_init__(self) -> None:
        self.target_a = self.target_a or self.a
        self.target_b = self.target_b or self.b


def _too_close(y: float, x: float, a: float, cells: list[Cell], skip: Cell | None = None,
               factor: float = 0.9) -> bool:
    return any(c is not skip and math.hypot(y - c.y, x - c.x) < (a + c.a) * factor for c in cells)


def render_cell(cell: Cell, labels: np.ndarray, signal: np.ndarray) -> None:
    """Draw one ellipse into a label frame and its intensity into a signal frame, (Y, X)."""
    height, width = labels.shape
    reach = cell.a + 1
    y0, y1 = max(0, int(cell.y - reach)), min(height, int(math.ceil(cell.y + reach)) + 1)
    x0, x1 = max(0, int(cell.x - reach)), min(width, int(math.ceil(cell.x + reach)) + 1)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = yy - cell.y, xx - cell.x
    cos, sin = math.cos(cell.theta), math.sin(cell.theta)
    u = (dx * cos + dy * sin) / cell.a
    v = (-dx * sin + dy * cos) / cell.b
    rho2 = u * u + v * v
    inside = rho2 <= 1.0
    labels[y0:y1, x0:x1][inside] = cell.label
    profile = cell.brightness * (1.0 - 0.35 * rho2)  # brighter centre, like a nucleus
    window = signal[y0:y1, x0:x1]
    window[inside] = profile[inside]


def place_initial(rng: np.random.Generator, n_cells: int, shape: tuple[int, int],
                   radius: float) -> list[Cell]:
    height, width = shape
    cells: list[Cell] = []
    speed = radius * 0.08
    for label in range(1, n_cells + 1):
        for _ in range(2000):
            a = radius * rng.uniform(1.0, 1.3)
            b = radius * rng.uniform(0.7, 0.95)
            y = rng.uniform(a + 2, height - a - 2)
            x = rng.uniform(a + 2, width - a - 2)
            if not _too_close(y, x, a, cells, factor=1.1):
                break
        else:
            raise ValueError(f"cannot fit {n_cells} cells of radius ~{radius:.0f} px into an image "
                             f"of shape {shape} without overlap; use fewer cells or a larger shape")
        angle = rng.uniform(0, 2 * math.pi)
        cells.append(Cell(label=label, y=y, x=x, a=a, b=b, theta=rng.uniform(0, math.pi),
                           vy=speed * math.sin(angle), vx=speed * math.cos(angle),
                           brightness=rng.uniform(1500.0, 4000.0)))
    return cells


def _entering_cell(rng: np.random.Generator, label: int, shape: tuple[int, int], radius: float,
                   cells: list[Cell]) -> Cell | None:
    """A cell whose centre sits just outside a random border, moving inwards."""
    height, width = shape
    a, b = radius * 1.1, radius * 0.85
    speed = radius * 0.25
    for _ in range(50):
        side = int(rng.integers(4))
        along = rng.uniform(0.25, 0.75)
        y, x, vy, vx = {
            0: (-0.3 * a, along * width, speed, 0.0),
            1: (height - 1 + 0.3 * a, along * width, -speed, 0.0),
            2: (along * height, -0.3 * a, 0.0, speed),
            3: (along * height, width - 1 + 0.3 * a, 0.0, -speed),
        }[side]
        if not _too_close(y, x, a, cells, factor=1.2):
            return Cell(label=label, y=y, x=x, a=a, b=b, theta=math.atan2(vy, vx), vy=vy, vx=vx,
                         brightness=rng.uniform(1500.0, 4000.0), entering=True)
    return None


def _divide(rng: np.random.Generator, parent: Cell, next_label: int,
            shape: tuple[int, int]) -> list[Cell]:
    height, width = shape
    offset = 0.75 * parent.a
    cos, sin = math.cos(parent.theta), math.sin(parent.theta)
    daughters = []
    for k, sign in enumerate((1.0, -1.0)):
        a, b = 0.62 * parent.target_a, 0.72 * parent.target_b
        y = float(np.clip(parent.y + sign * offset * sin, a + 1, height - a - 1))
        x = float(np.clip(parent.x + sign * offset * cos, a + 1, width - a - 1))
        push = 0.05 * parent.a
        daughters.append(Cell(
            label=next_label + k, y=y, x=x, a=a, b=b,
            theta=parent.theta + math.pi / 2 + rng.normal(0, 0.3),
            vy=parent.vy + sign * push * sin, vx=parent.vx + sign * push * cos,
            brightness=parent.brightness * rng.uniform(0.9, 1.1), parent=parent.label,
            target_a=parent.target_a * 0.9, target_b=parent.target_b * 0.9,
        ))
    return daughters


def move_cell(rng: np.random.Generator, cell: Cell, cells: list[Cell], shape: tuple[int, int],
          speed: float) -> None:
    """Random walk with drift; steps that bump into a neighbour are retried, then skipped."""
    height, width = shape
    cell.vy = 0.9 * cell.vy + rng.normal(0, 0.3 * speed)
    cell.vx = 0.9 * cell.vx + rng.normal(0, 0.3 * speed)
    if cell.entering:
        # keep heading inwards until fully inside
        inside = cell.a + 1 <= cell.y <= height - cell.a - 1 and cell.a + 1 <= cell.x <= width - cell.a - 1
        if inside:
            cell.entering = False
        else:
            cell.y += cell.vy
            cell.x += cell.vx
            return
    for _ in range(5):
        y = cell.y + cell.vy + rng.normal(0, 0.3 * speed)
        x = cell.x + cell.vx + rng.normal(0, 0.3 * speed)
        if y < cell.a + 1 or y > height - cell.a - 1:
            cell.vy = -cell.vy
            y = float(np.clip(y, cell.a + 1, height - cell.a - 1))
        if x < cell.a + 1 or x > width - cell.a - 1:
            cell.vx = -cell.vx
            x = float(np.clip(x, cell.a + 1, width - cell.a - 1))
        before = [math.hypot(cell.y - c.y, cell.x - c.x) for c in cells if c is not cell]
        after = [math.hypot(y - c.y, x - c.x) for c in cells if c is not cell]
        limits = [(cell.a + c.a) * 0.9 for c in cells if c is not cell]
        # accept unless the step brings the cell closer to a neighbour it is already too near
        if all(d1 >= lim or d1 >= d0 for d0, d1, lim in zip(before, after, limits)):
            cell.y, cell.x = y, x
            break
        cell.vy, cell.vx = rng.normal(0, speed, 2)
    cell.theta += rng.normal(0, 0.05)
    cell.a = min(cell.target_a, cell.a * 1.02)
    cell.b = min(cell.target_b, cell.b * 1.02)


def camera(rng: np.random.Generator, signal: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Blur, shot noise and read noise on top of the offset; (Y, X) float -> `dtype`."""
    expected = ndimage.gaussian_filter(signal, PSF_SIGMA) + BACKGROUND
    scale = 1.0
    if dtype.kind in "iu" and np.iinfo(dtype).max < 10_000:  # e.g. uint8: fewer photons
        scale = np.iinfo(dtype).max / 5000.0
    counts = rng.poisson(np.clip(expected * scale, 0, None)).astype(np.float64)
    counts += rng.normal(0.0, READ_NOISE * scale, counts.shape)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        counts = np.clip(np.round(counts), info.min, info.max)
    return counts.astype(dtype)


def make_timelapse(n_frames: int = 20, shape: tuple[int, int] = (256, 256), n_cells: int = 5,
                   divide: bool = True, enter: bool = True, seed: int = 0,
                   dtype=np.uint16) -> SyntheticTimelapse:
    """Simulate a 2D fluorescence time-lapse of moving, dividing cells, with ground truth.

    Parameters
    ----------
    n_frames : int
        Number of frames T (at least 1).
    shape : (int, int)
        Frame size (Y, X). Cell size scales with it (radius ~6 % of the shorter side).
    n_cells : int
        Cells present in the first frame.
    divide : bool
        Let about a third of the cells (at least one) divide between 1/4 and
        3/4 of the movie (needs ``n_frames >= 4``). The mother's track ends;
        two smaller daughters start in the next frame on either side of it.
    enter : bool
        Let one extra cell enter from a random border half-way (needs
        ``n_frames >= 4``; skipped if there is no free room at the border).
    seed : int
        Seed of the random generator: the same arguments give the same result.
    dtype : numpy dtype
        dtype of `image` (uint16 default; uint8 is rescaled to fit; float keeps counts).

    Returns
    -------
    SyntheticTimelapse
        ``image`` (T, Y, X), ``labels`` (T, Y, X) uint16, ``lineage`` (CTC
        ``label, begin, end, parent``) and true ``positions``.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be at least 1, got {n_frames}")
    if len(shape) != 2 or min(shape) < 16:
        raise ValueError(f"shape must be (Y, X) with both sizes >= 16, got {tuple(shape)}")
    if n_cells < 0:
        raise ValueError(f"n_cells must be >= 0, got {n_cells}")
    dtype = np.dtype(dtype)
    shape = (int(shape[0]), int(shape[1]))
    rng = np.random.default_rng(seed)
    radius = max(3.0, 0.06 * min(shape))
    speed = radius * 0.08

    cells = place_initial(rng, n_cells, shape, radius)
    next_label = n_cells + 1
    if divide and n_frames >= 4 and cells:
        n_div = max(1, n_cells // 3)
        chosen = rng.choice(len(cells), size=min(n_div, len(cells)), replace=False)
        for i in sorted(chosen.tolist()):
            cells[i].divides_at = int(rng.integers(max(1, n_frames // 4), max(2, 3 * n_frames // 4) + 1))
    enter_at = n_frames // 2 if enter and n_frames >= 4 else None

    labels = np.zeros((n_frames,) + shape, np.uint16)
    image = np.zeros((n_frames,) + shape, dtype)
    parents: dict[int, int] = {}
    rows = []
    for t in range(n_frames):
        born = []
        for cell in [c for c in cells if c.divides_at == t]:
            cells.remove(cell)
            daughters = _divide(rng, cell, next_label, shape)
            next_label += 2
            born += daughters
        cells += born
        for d in born:
            parents[d.label] = d.parent
        if t == enter_at:
            newcomer = _entering_cell(rng, next_label, shape, radius, cells)
            if newcomer is not None:
                cells.append(newcomer)
                next_label += 1
        signal = np.zeros(shape, np.float64)
        for cell in sorted(cells, key=lambda c: c.label):
            render_cell(cell, labels[t], signal)
            rows.append((t, cell.label, cell.y, cell.x))
        image[t] = camera(rng, signal, dtype)
        for cell in cells:
            move_cell(rng, cell, cells, shape, speed)

    lineage = lineage_from_labels(labels, parents)
    positions = pd.DataFrame(rows, columns=["frame", "label", "y", "x"])
    return SyntheticTimelapse(image=image, labels=labels, lineage=lineage, positions=positions,
                              seed=seed)


def lineage_from_labels(labels: np.ndarray, parents: dict[int, int]) -> list[tuple[int, int, int, int]]:
    """CTC lineage from what was actually drawn (a cell hidden in a frame does not count)."""
    begin: dict[int, int] = {}
    end: dict[int, int] = {}
    for t, frame in enumerate(labels):
        ids = np.unique(frame)
        for label in ids[ids != 0].tolist():
            begin.setdefault(label, t)
            end[label] = t
    return [(lab, begin[lab], end[lab], parents.get(lab, 0) if parents.get(lab, 0) in begin else 0)
            for lab in sorted(begin)]


def write_ctc_ground_truth(ts: SyntheticTimelapse, dirpath: str | os.PathLike,
                           overwrite: bool = False) -> Path:
    """Write the ground truth in the Cell Tracking Challenge layout, atomically.

    Creates::

        dirpath/TRA/man_track000.tif ...  tracking masks, uint16
        dirpath/TRA/man_track.txt          "L B E P" per track
        dirpath/SEG/man_seg000.tif ...     segmentation masks, uint16

    (4-digit numbers when there are more than 1000 frames.)

    Parameters
    ----------
    ts : SyntheticTimelapse
    dirpath : path-like
        The ground-truth folder, e.g. ``"01_GT"``.
    overwrite : bool
        Replace an existing folder.

    Returns
    -------
    pathlib.Path
        `dirpath`.
    """
    from .io.atomic import atomic_path
    from .io.ctc import format_tracks, split_gaps, write_ctc_folder

    with atomic_path(dirpath, overwrite=overwrite, directory=True) as tmp:
        spans, files = write_ctc_folder(tmp, ts.labels, prefix="man_track", subdir="TRA")
        rows = split_gaps(files, spans, ts.lineage)
        (tmp / "TRA" / "man_track.txt").write_text(format_tracks(rows))
        write_ctc_folder(tmp, ts.labels, prefix="man_seg", subdir="SEG")
    return Path(dirpath)


def write_ctc_images(ts: SyntheticTimelapse, dirpath: str | os.PathLike,
                     overwrite: bool = False) -> Path:
    """Write the raw frames as a CTC image sequence ``dirpath/t000.tif, t001.tif, ...``, atomically."""
    from .io.atomic import atomic_path
    from .io.ctc import ctc_digits

    digits = ctc_digits(ts.n_frames)
    with atomic_path(dirpath, overwrite=overwrite, directory=True) as tmp:
        for t, frame in enumerate(ts.image):
            tifffile.imwrite(tmp / f"t{t:0{digits}d}.tif", frame)
    return Path(dirpath)
