"""Axis names: validating user-given axes, guessing them, mapping file conventions.

Our axes are letters from ``"TZCYX"``. Files name axes differently (tifffile
uses ``Q``, ``I``, ``S``...; OME-Zarr uses lowercase names); the helpers here
turn them into ours and put them in canonical order.
"""

from __future__ import annotations

import warnings

import dask.array as da

from .stack import CANONICAL_AXES

# Letters that tifffile uses for "a sequence of images of unknown meaning".
_TIFF_SEQUENCE = "IQ"
# Letters that tifffile uses for spectral/sample dimensions we treat as channels.
_TIFF_CHANNEL_LIKE = "SE"
_TIFF_NAMES = {
    "A": "angle", "P": "phase", "R": "tile", "H": "lifetime", "E": "lambda",
    "L": "exposure", "V": "event", "M": "mosaic", "Q": "unknown", "I": "sequence",
    "S": "sample", "O": "other",
}


def validate_axes(axes: str, shape: tuple[int, ...], what: str = "the data") -> str:
    """Check user-given axes against a data shape and return them upper-cased.

    Parameters
    ----------
    axes : str
        One letter per dimension, from ``"TZCYX"`` (any order, any case).
    shape : tuple of int
        Shape of the data the axes describe.
    what : str
        How to name the data in error messages (e.g. a file name).

    Raises
    ------
    ValueError
        If the length differs from ``len(shape)``, a letter is not one of
        ``TZCYX``, a letter repeats, or ``Y``/``X`` is missing.
    """
    if not isinstance(axes, str):
        raise TypeError(f"axes must be a string such as 'TYX', got {type(axes).__name__}")
    given = axes
    axes = axes.upper()
    hint = f"{what} has shape {tuple(shape)} ({len(shape)} dimensions) but axes={given!r} was given"
    if len(axes) != len(shape):
        raise ValueError(f"{hint}: give exactly one letter per dimension, e.g. "
                         f"{_example_axes(len(shape))!r}")
    bad = sorted({a for a in axes if a not in CANONICAL_AXES})
    if bad:
        raise ValueError(f"{hint}: unknown axis letter(s) {', '.join(bad)}; "
                         f"use letters from {CANONICAL_AXES!r}")
    repeated = sorted({a for a in axes if axes.count(a) > 1})
    if repeated:
        raise ValueError(f"{hint}: axis letter(s) {', '.join(repeated)} repeated; "
                         "each axis may appear once")
    missing = [a for a in "YX" if a not in axes]
    if missing:
        raise ValueError(f"{hint}: axes must include Y and X (missing {', '.join(missing)})")
    return axes


def _example_axes(ndim: int) -> str:
    return {2: "YX", 3: "TYX", 4: "TCYX", 5: "TZCYX"}.get(ndim, "TZCYX")


def guess_axes(shape: tuple[int, ...]) -> str:
    """Guess axes for an array that came without any.

    Rules (pass ``axes=`` explicitly whenever you know better):

    - 2D: ``"YX"``
    - 3D: ``"YXC"`` if the last dimension is 3 or 4 (RGB/RGBA) and the others
      are larger, else ``"TYX"``
    - 4D: ``"TYXC"`` if the last dimension is 3 or 4, else ``"TCYX"`` if the
      second dimension is at most 4, else ``"TZYX"``
    - 5D: ``"TZCYX"``

    Raises
    ------
    ValueError
        For 0-, 1- or more than 5-dimensional shapes.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    rgb_last = ndim >= 3 and shape[-1] in (3, 4) and min(shape[-3:-1]) > 4
    if ndim == 2:
        return "YX"
    if ndim == 3:
        return "YXC" if rgb_last else "TYX"
    if ndim == 4:
        if rgb_last:
            return "TYXC"
        guess = "TCYX" if shape[1] <= 4 else "TZYX"
        warnings.warn(f"guessed axes {guess!r} for a 4D array of shape {shape}; "
                      "pass axes=... to say what they are", stacklevel=3)
        return guess
    if ndim == 5:
        return "TZCYX"
    raise ValueError(f"cannot guess axes for an array of shape {shape} ({ndim} dimensions): "
                     "images must have 2 to 5 dimensions (T, Z, C, Y, X); "
                     "reshape it or pass axes=...")


def to_canonical(data: da.Array, axes: str) -> tuple[da.Array, str]:
    """Transpose `data` lazily so that its axes follow the order ``T Z C Y X``.

    Parameters
    ----------
    data : dask.array.Array
        Array whose dimensions are named by `axes`.
    axes : str
        Validated axes (see `validate_axes`).

    Returns
    -------
    data : dask.array.Array
        Transposed view (no pixels read).
    axes : str
        The canonical axes, e.g. ``"YXC"`` -> ``"CYX"``.
    """
    order = [axes.index(a) for a in CANONICAL_AXES if a in axes]
    canonical = "".join(axes[i] for i in order)
    if order != list(range(len(axes))):
        data = data.transpose(order)
    return data, canonical


def map_tiff_axes(tiff_axes: str, shape: tuple[int, ...], what: str) -> tuple[tuple, str]:
    """Map tifffile axis letters onto ours.

    ``T Z C Y X`` are kept. ``S`` (samples, e.g. RGB) and ``E`` (wavelength)
    become ``C``. ``I`` and ``Q`` (an unnamed sequence of pages, as in a plain
    multipage TIFF) become ``T``, or ``Z`` when ``T`` is taken. Any other
    axis of size 1 is dropped.

    Parameters
    ----------
    tiff_axes : str
        ``series.axes`` from tifffile, e.g. ``"QYX"``, ``"TZCYX"``, ``"YXS"``.
    shape : tuple of int
        ``series.shape``.
    what : str
        File name for error messages.

    Returns
    -------
    index : tuple
        Index to apply to the data: ``slice(None)`` for kept axes, ``0`` for
        dropped ones.
    axes : str
        Our letters for the kept axes, in the file's order.

    Raises
    ------
    StackReadError
        If an axis of size > 1 has no place in ``TZCYX``.
    """
    from .stack import StackReadError

    tiff_axes = tiff_axes.upper()
    present = set(a for a in tiff_axes if a in CANONICAL_AXES)
    index: list = []
    out = ""
    for letter, size in zip(tiff_axes, shape):
        mapped = None
        if letter in CANONICAL_AXES:
            mapped = letter
        elif letter in _TIFF_CHANNEL_LIKE and "C" not in present:
            mapped = "C"
        elif letter in _TIFF_SEQUENCE:
            mapped = next((a for a in "TZ" if a not in present), None)
        if mapped is not None and size == 1 and letter not in CANONICAL_AXES:
            mapped = None  # a singleton unnamed axis carries no information
        if mapped is None:
            if size != 1:
                name = _TIFF_NAMES.get(letter, "unknown")
                raise StackReadError(
                    f"{what}: axis {letter!r} ({name}) of size {size} in axes {tiff_axes!r}, "
                    f"shape {tuple(shape)} has no place in {CANONICAL_AXES}; "
                    f"pass axes=... with {len(shape)} letters to say what each axis is"
                )
            index.append(0)
            continue
        present.add(mapped)
        index.append(slice(None))
        out += mapped
    return tuple(index), out
