"""Image features kept across passes, sessions and runs: each frame is encoded once.

An entry is one frame's three feature levels (what the mask decoder and the memory encoder read),
stored as a Zarr array of one chunk, in the dtype the model computes in (fp32 entries are the exact
bits the encoder gave, so cached results stay equal to the reference). Its key is a hash of the
frame's pixels as read, the stack-wide normalisation, the image size, the precision and the image
encoder's weights: an edited frame, another model or other settings never meet a stale entry.

Entries are written in a private folder and renamed into place (two processes filling one cache
never see each other's half-written entries), carry a checksum of their bytes (a corrupt or
truncated entry is deleted and recomputed, never used), and are evicted least recently used first
beyond a size cap. Location: ``feature_cache=`` argument, else ``$NAPARI_SAM2_FEATURES``, else
``features/`` in the download cache folder (``~/.cache/napari-sam2/features`` on Linux).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..io.owner import TAG_PATTERN, owner_tag, remove_stale

FEATURES_ENV = "NAPARI_SAM2_FEATURES"  # a folder, or "off"
FEATURES_SIZE_ENV = "NAPARI_SAM2_FEATURES_GB"
DEFAULT_MAX_GB = 20.0
OFF = ("off", "none", "0", "false", "no")
ENTRY_SUFFIX = ".zarr"
_TMP_PREFIX = ".writing-"

# one frame's features: B x C x H x W tensors in a fixed order, B = 1
Levels = tuple[torch.Tensor, ...]


def default_location() -> Path:
    from ..checkpoints import cache_dir

    return cache_dir() / "features"


def max_bytes_from_env() -> int:
    raw = os.environ.get(FEATURES_SIZE_ENV, "").strip()
    try:
        gb = float(raw) if raw else DEFAULT_MAX_GB
    except ValueError:
        raise ValueError(f"${FEATURES_SIZE_ENV} must be a number of GB, got {raw!r}.") from None
    return int(gb * 2**30)


class MemoryFeatureCache:
    """The same interface in RAM, bounded by bytes: the fallback when no folder can be written."""

    location = None

    def __init__(self, max_bytes: int = 2 * 2**30):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Levels] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> Levels | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: str, levels: Levels) -> None:
        size = sum(t.numel() * t.element_size() for t in levels)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = tuple(t.detach().cpu() for t in levels)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= sum(t.numel() * t.element_size() for t in old)


def _layout(t: torch.Tensor) -> list[int]:
    """The order of ``t``'s dims in memory, outermost first (the encoder gives channels-last maps)."""
    return sorted(range(t.ndim), key=lambda d: (-t.stride(d), d))


def _to_bytes(levels: Levels) -> tuple[np.ndarray, dict]:
    """Levels -> one flat numpy array in each level's own memory order (bf16 kept as its raw 16 bits), and
    what rebuilds them: shapes, memory orders, dtype. The layout is kept because kernels choose their
    summation order by it: a contiguous copy of a channels-last map gives other last bits downstream."""
    dtype = levels[0].dtype
    orders = [_layout(t) for t in levels]
    flat = torch.cat([t.detach().permute(o).reshape(-1).cpu() for t, o in zip(levels, orders)])
    arr = flat.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else flat.numpy()
    return arr, {"shapes": [list(t.shape) for t in levels], "orders": orders, "dtype": str(dtype).removeprefix("torch.")}


def _from_bytes(arr: np.ndarray, meta: dict) -> Levels:
    if meta["dtype"] == "bfloat16":
        flat = torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    else:
        flat = torch.from_numpy(arr.copy())
    shapes, orders = meta["shapes"], meta["orders"]
    sizes = [int(np.prod(s)) for s in shapes]
    out = []
    for part, shape, order in zip(torch.split(flat, sizes), shapes, orders):
        stored = part.reshape([shape[d] for d in order])
        out.append(stored.permute(np.argsort(order).tolist()))
    return tuple(out)


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(arr)).cast("B")).hexdigest()


class DiskFeatureCache:
    """Frame features in a folder of Zarr entries, ``<folder>/<key[:2]>/<key>.zarr``."""

    def __init__(self, location: str | os.PathLike, max_bytes: int | None = None):
        self.location = Path(location).expanduser()
        self.max_bytes = max_bytes_from_env() if max_bytes is None else int(max_bytes)
        self._lock = threading.Lock()
        self._bytes: int | None = None  # measured on the first write
        self._fallback: MemoryFeatureCache | None = None
        try:
            self.location.mkdir(parents=True, exist_ok=True)
            remove_stale(str(self.location), re.escape(_TMP_PREFIX) + TAG_PATTERN + r"-.+")
        except OSError as exc:
            self._fall_back(exc)

    # ---------------------------------------------------------------- entries
    def _path(self, key: str) -> Path:
        return self.location / key[:2] / f"{key}{ENTRY_SUFFIX}"

    def get(self, key: str) -> Levels | None:
        if self._fallback is not None:
            return self._fallback.get(key)
        path = self._path(key)
        if not path.is_dir():
            return None
        try:
            levels = self._read(path, key)
        except Exception:  # noqa: BLE001 - any damage to an entry means: recompute it
            levels = None
        if levels is None:
            shutil.rmtree(path, ignore_errors=True)
            return None
        try:
            os.utime(path)  # least recently used goes first
        except OSError:
            pass
        return levels

    def contains(self, key: str) -> bool:
        """Whether an entry exists (it is still checked when read)."""
        if self._fallback is not None:
            return self._fallback.contains(key)
        return self._path(key).is_dir()

    @staticmethod
    def _read(path: Path, key: str) -> Levels | None:
        import zarr

        arr = zarr.open_array(str(path), mode="r")
        meta = dict(arr.attrs)
        if meta.get("key") != key:
            return None
        data = np.asarray(arr[...])
        if _digest(data) != meta.get("sha256"):
            return None
        return _from_bytes(data, meta)

    def put(self, key: str, levels: Levels) -> None:
        if self._fallback is not None:
            return self._fallback.put(key, levels)
        final = self._path(key)
        if final.is_dir():
            return
        arr, layout = _to_bytes(levels)
        tmp = self.location / f"{_TMP_PREFIX}{owner_tag()}-{key[:16]}-{threading.get_ident()}{ENTRY_SUFFIX}"
        try:
            self._write(tmp, arr, {"key": key, **layout, "sha256": _digest(arr)})
            final.parent.mkdir(exist_ok=True)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():  # not another process's entry of the same frame
                    raise
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be written must not stop the work
            shutil.rmtree(tmp, ignore_errors=True)
            self._fall_back(exc)
            self._fallback.put(key, levels)
            return
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self._account(arr.nbytes)

    @staticmethod
    def _write(path: Path, arr: np.ndarray, meta: dict) -> None:
        import zarr

        if int(zarr.__version__.split(".")[0]) >= 3:
            # uncompressed: features hardly compress, and a frame's entry must cost far less than encoding it
            z = zarr.create_array(str(path), shape=arr.shape, chunks=arr.shape, dtype=arr.dtype, compressors=None,
                                  attributes=meta)
            z[...] = arr
        else:
            z = zarr.open_array(str(path), mode="w", shape=arr.shape, chunks=arr.shape, dtype=arr.dtype, compressor=None)
            z[...] = arr
            z.attrs.update(meta)

    # ---------------------------------------------------------------- size cap
    def entries(self) -> list[tuple[float, int, Path]]:
        """(last used, bytes, path) of every complete entry."""
        found = []
        for sub in self.location.iterdir() if self.location.is_dir() else ():
            if not sub.is_dir() or sub.name.startswith("."):
                continue
            for entry in sub.glob(f"*{ENTRY_SUFFIX}"):
                try:
                    size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
                    found.append((entry.stat().st_mtime, size, entry))
                except OSError:  # removed by another process meanwhile
                    continue
        return found

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def _account(self, added: int) -> None:
        with self._lock:
            if self._bytes is None:
                self._bytes = self.size_bytes()
            else:
                self._bytes += added
            if self._bytes <= self.max_bytes:
                return
            # evict down to 90 % of the cap, so that the next frames do not each pay a scan
            found = sorted(self.entries())
            total = sum(size for _, size, _ in found)
            for _, size, path in found:
                if total <= 0.9 * self.max_bytes:
                    break
                shutil.rmtree(path, ignore_errors=True)
                total -= size
            self._bytes = total

    def _fall_back(self, exc: Exception) -> None:
        if self._fallback is None:
            warnings.warn(
                f"the feature cache folder {self.location} cannot be written ({getattr(exc, 'strerror', None) or exc}): image "
                f"features are kept in memory for this session only. Free disk space, or set ${FEATURES_ENV} "
                "to a writable folder.",
                RuntimeWarning,
                stacklevel=3,
            )
            self._fallback = MemoryFeatureCache()

    @property
    def in_memory(self) -> bool:
        """Whether the folder failed and entries are kept in RAM instead."""
        return self._fallback is not None


def open_feature_cache(feature_cache=None):
    """The cache behind ``feature_cache=``: None -> ``$NAPARI_SAM2_FEATURES`` or the default folder;
    a path -> that folder; False or "off" -> none (only the last frames stay in RAM)."""
    if feature_cache is False:
        return None
    if isinstance(feature_cache, (DiskFeatureCache, MemoryFeatureCache)):
        return feature_cache
    if feature_cache is None:
        env = os.environ.get(FEATURES_ENV, "").strip()
        if env.lower() in OFF:
            return None
        return DiskFeatureCache(env or default_location())
    if isinstance(feature_cache, str) and feature_cache.strip().lower() in OFF:
        return None
    if isinstance(feature_cache, (str, os.PathLike)):
        return DiskFeatureCache(feature_cache)
    raise TypeError(f"feature_cache must be None, a folder, or False, got {type(feature_cache).__name__}.")


def settings_key(**settings) -> str:
    """A digest of everything besides the pixels that the features depend on."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def frame_key(settings: str, frame: np.ndarray) -> str:
    h = hashlib.sha256(settings.encode())
    h.update(f"{frame.shape}|{frame.dtype.str}|".encode())
    h.update(memoryview(np.ascontiguousarray(frame)).cast("B"))
    return h.hexdigest()


def weights_fingerprint(modules) -> str:
    """A digest of the weights of ``modules`` (memoised on their tensors' version counters: an
    in-place update, as fine-tuning makes, changes the fingerprint)."""
    tensors = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
    # tensors made under inference mode have no version counter (and cannot be trained in place)
    stamp = tuple((id(t), -1 if t.is_inference() else t._version) for t in tensors)
    memo = getattr(modules[0], "_napari_sam2_fingerprint", None)
    if memo is not None and memo[0] == stamp:
        return memo[1]
    h = hashlib.sha256()
    for t in tensors:
        data = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{tuple(t.shape)}{data.dtype}".encode())
        h.update(memoryview(data.view(torch.uint8).numpy()).cast("B"))
    digest = h.hexdigest()
    modules[0]._napari_sam2_fingerprint = (stamp, digest)
    return digest
