"""Synthetic colonies that divide for several generations, with ground truth.

`make_colony` grows a colony from a few cells: each cell divides one cell cycle (with jitter) after
its birth, for ``generations`` generations (one cell -> 8 after 3), daughters are born touching each
other and neighbours touch as they grow; some cells of the last generation leave the field across
the nearest border. The image model, the cells' drawing and the result
(:class:`~napari_sam2.synthetic.SyntheticTimelapse`: image, labels, CTC lineage, positions) are those
of :func:`napari_sam2.synthetic.make_timelapse`, so `write_ctc_ground_truth` and `clicks` work alike.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .synthetic import Cell, SyntheticTimelapse, camera, lineage_from_labels, move_cell, place_initial, render_cell

__all__ = ["make_colony"]


def _daughters(rng: np.random.Generator, parent: Cell, next_label: int, shape: tuple[int, int],
               touching: bool) -> list[Cell]:
    """Two daughters side by side along the mother's long axis, overlapping a little when ``touching``
    (the later drawn covers the earlier: they share a border, joined by a narrow neck)."""
    height, width = shape
    a, b = 0.62 * parent.target_a, 0.72 * parent.target_b
    theta = parent.theta + math.pi / 2  # daughters lie across the mother's long axis, as after cytokinesis
    offset = 1.03 * b if touching else 1.2 * b  # half the distance between the daughters' centres
    cos, sin = math.cos(parent.theta), math.sin(parent.theta)
    centres = [(parent.y + sign * offset * sin, parent.x + sign * offset * cos) for sign in (1.0, -1.0)]
    # a mother at the border: move the pair inwards together (clipping each would push them into each other)
    ys, xs = [c[0] for c in centres], [c[1] for c in centres]
    dy = max(0.0, a + 1 - min(ys)) - max(0.0, max(ys) - (height - a - 1))
    dx = max(0.0, a + 1 - min(xs)) - max(0.0, max(xs) - (width - a - 1))
    cells = []
    for k, (sign, (y, x)) in enumerate(zip((1.0, -1.0), centres)):
        push = 0.05 * parent.a
        cells.append(Cell(label=next_label + k, y=y + dy, x=x + dx, a=a, b=b, theta=theta,
                           vy=parent.vy + sign * push * sin, vx=parent.vx + sign * push * cos,
                           brightness=parent.brightness * rng.uniform(0.9, 1.1), parent=parent.label,
                           target_a=parent.target_a * 0.9, target_b=parent.target_b * 0.9))
    return cells


def _leave(cell: Cell, shape: tuple[int, int], speed: float) -> None:
    """Send a cell towards its nearest border, fast."""
    height, width = shape
    dist = {(-1, 0): cell.y, (1, 0): height - cell.y, (0, -1): cell.x, (0, 1): width - cell.x}
    (dy, dx), _ = min(dist.items(), key=lambda kv: kv[1])
    cell.vy, cell.vx = dy * speed, dx * speed
    cell.divides_at = None


def _outside(cell: Cell, shape: tuple[int, int]) -> bool:
    height, width = shape
    r = cell.a + 1
    return cell.y < -r or cell.y > height - 1 + r or cell.x < -r or cell.x > width - 1 + r


def make_colony(n_frames: int = 40, shape: tuple[int, int] = (128, 128), n_cells: int = 1, generations: int = 3,
                cycle: int = 10, jitter: int = 2, leave: int = 0, touching: bool = True, seed: int = 0,
                dtype=np.uint16) -> SyntheticTimelapse:
    """Simulate a colony dividing for ``generations`` generations, with ground truth.

    Parameters
    ----------
    n_frames : int
        Number of frames T.
    shape : (int, int)
        Frame size (Y, X); the cells' radius is ~6 % of the shorter side (daughters are smaller).
    n_cells : int
        Cells of the first frame (generation 0), placed at random without overlap.
    generations : int
        How many times a lineage divides: ``n_cells * 2**generations`` cells in the end (less those
        that left).
    cycle, jitter : int
        A cell divides ``cycle + U{-jitter..jitter}`` frames after its birth (the first cells half a
        cycle after frame 0, jittered too): the cell cycle length.
    leave : int
        This many cells of the last generation, those nearest a border, leave the field from
        ``max(1, cycle // 3)`` frames after their birth on (their track ends when they are gone; they
        never come back).
    touching : bool
        Daughters are born touching each other (one piece with a narrow neck in the masks); else a
        gap of about a fifth of their width separates them.
    seed : int
        The same arguments give the same colony.
    dtype : numpy dtype
        dtype of the image.

    Returns
    -------
    SyntheticTimelapse
        ``lineage`` holds every division (``divisions`` lists them).
    """
    if n_frames < 1 or n_cells < 1 or generations < 0 or cycle < 2 or not 0 <= jitter < cycle // 2 + 1 or leave < 0:
        raise ValueError("make_colony needs n_frames >= 1, n_cells >= 1, generations >= 0, cycle >= 2, "
                         f"0 <= jitter <= cycle // 2 and leave >= 0; got {n_frames}, {n_cells}, {generations}, "
                         f"{cycle}, {jitter}, {leave}")
    if len(shape) != 2 or min(shape) < 32:
        raise ValueError(f"shape must be (Y, X) with both sizes >= 32, got {tuple(shape)}")
    dtype = np.dtype(dtype)
    shape = (int(shape[0]), int(shape[1]))
    rng = np.random.default_rng(seed)
    radius = max(4.0, 0.06 * min(shape))
    speed = radius * 0.05
    cells = place_initial(rng, n_cells, shape, radius)
    generation = {c.label: 0 for c in cells}
    for c in cells:
        c.divides_at = max(1, cycle // 2 + int(rng.integers(-jitter, jitter + 1))) if generations else None
    next_label = n_cells + 1
    to_leave = leave

    labels = np.zeros((n_frames,) + shape, np.uint16)
    image = np.zeros((n_frames,) + shape, dtype)
    parents: dict[int, int] = {}
    leaving: set[int] = set()
    rows = []
    for t in range(n_frames):
        for cell in [c for c in cells if c.divides_at == t]:
            cells.remove(cell)
            born = _daughters(rng, cell, next_label, shape, touching)
            next_label += 2
            for d in born:
                parents[d.label] = cell.label
                generation[d.label] = generation[cell.label] + 1
                last = generation[d.label] >= generations
                d.divides_at = None if last else t + cycle + int(rng.integers(-jitter, jitter + 1))
            cells += born
        if to_leave:
            ready = [c for c in cells if generation[c.label] >= generations and c.label not in leaving
                     and t - _birth(rows, c.label, t) >= max(1, cycle // 3)]
            for cell in sorted(ready, key=lambda c: _border_distance(c, shape))[:to_leave]:
                _leave(cell, shape, radius * 0.6)
                leaving.add(cell.label)
                to_leave -= 1
        cells = [c for c in cells if not (c.label in leaving and _outside(c, shape))]
        signal = np.zeros(shape, np.float64)
        for cell in sorted(cells, key=lambda c: c.label):
            render_cell(cell, labels[t], signal)
            rows.append((t, cell.label, cell.y, cell.x))
        image[t] = camera(rng, signal, dtype)
        for cell in cells:
            if cell.label in leaving:
                cell.y += cell.vy
                cell.x += cell.vx
            else:
                move_cell(rng, cell, [c for c in cells if c.label not in leaving], shape, speed)

    lineage = lineage_from_labels(labels, parents)
    positions = pd.DataFrame(rows, columns=["frame", "label", "y", "x"])
    return SyntheticTimelapse(image=image, labels=labels, lineage=lineage, positions=positions, seed=seed)


def _birth(rows: list[tuple], label: int, t: int) -> int:
    return next((r[0] for r in rows if r[1] == label), t)


def _border_distance(cell: Cell, shape: tuple[int, int]) -> float:
    return min(cell.y, shape[0] - cell.y, cell.x, shape[1] - cell.x)
