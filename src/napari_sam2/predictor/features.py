"""Image features of a session's frames: the last few in RAM, the rest in the feature cache, the encoder
only for frames never seen with this model and these settings; the next frame prepared ahead."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ..heap import retained_heap
from ..modeling import SAM2
from ..modeling.sam2 import FrameFeatures
from .feature_cache import frame_key, settings_key, weights_fingerprint
from .frames import FrameSource

FORMAT = 1  # bump when what an entry holds changes
MAX_PENDING_WRITES = 4  # beyond this, a frame is not cached: the encoder must never wait for the disk


class FrameFeatureSource:
    """``features(t)`` -> :class:`FrameFeatures` of frame t (batch of 1) on the model's device.

    Parameters
    ----------
    cache
        A feature cache (:func:`~napari_sam2.predictor.feature_cache.open_feature_cache`) or None.
    ram_frames
        Frames whose features stay in RAM on the device (a step and its prompt read one frame).
    """

    def __init__(self, frames: FrameSource, model: SAM2, cache=None, ram_frames: int = 2):
        self.frames = frames
        self.model = model
        self.cache = cache
        self.ram_frames = ram_frames
        self._ram: OrderedDict[int, FrameFeatures] = OrderedDict()
        self._pending: dict[int, Future] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._writes: list[Future] = []
        self._settings: str | None = None
        self._lock = threading.Lock()
        self.encoded = 0  # frames run through the image encoder by this session
        self.from_cache = 0  # frames served by the feature cache

    def settings(self) -> str:
        if self._settings is None:
            m = self.model
            modules = [m.image_encoder, m.sam_mask_decoder.conv_s0, m.sam_mask_decoder.conv_s1]
            self._settings = settings_key(
                format=FORMAT, weights=weights_fingerprint(modules), precision=m.precision, **self.frames.settings()
            )
        return self._settings

    @property
    def in_ram(self) -> list[int]:
        return list(self._ram)

    def ready(self, t: int) -> bool:
        """Whether frame t's features are at hand (in RAM or in the cache): a prompt on it then runs
        the decoder alone, without the image encoder."""
        if t in self._ram:
            return True
        if self.cache is None:
            return False
        return self.cache.contains(frame_key(self.settings(), self.frames.raw(t)))

    # ---------------------------------------------------------------- one frame
    def _load(self, t: int, encode_here: bool, background: bool = False) -> tuple[str, FrameFeatures | np.ndarray, str | None]:
        """("features", f, key) from the cache (or encoded when ``encode_here``), else ("raw", frame, key).

        ``background``: a frame of a lazy dask array is read with dask's synchronous scheduler: on a Dask
        worker, the cluster's scheduler would queue the read behind the very task that waits for it."""
        raw = self.frames.raw(t, scheduler="synchronous" if background else None)
        key = frame_key(self.settings(), raw) if self.cache is not None else None
        if key is not None:
            levels = self.cache.get(key)
            if levels is not None:
                dev = self.model.device
                self.from_cache += 1
                return "features", self.model.features_from_levels(*(x.to(dev, non_blocking=True) for x in levels)), key
        if encode_here:
            return "features", self._encode_raw(raw, t, key), key
        return "raw", raw, key

    def _encode_raw(self, raw: np.ndarray, t: int, key: str | None) -> FrameFeatures:
        image = self.frames.model_input(raw, t).to(self.model.device, non_blocking=True)[None]  # 1 x 3 x S x S
        return self._encode(image, key)

    @torch.inference_mode()
    def _encode(self, image: torch.Tensor, key: str | None) -> FrameFeatures:
        feats = self.model.encode_frame(image)
        self.encoded += 1
        if key is not None:
            self._store(key, (feats.embed, feats.high_res[0], feats.high_res[1]))
        return feats

    def _store(self, key: str, levels) -> None:
        """Write an entry in the background (tracking goes on meanwhile)."""
        with self._lock:
            self._writes = [f for f in self._writes if not f.done()]
            if len(self._writes) >= MAX_PENDING_WRITES:
                return
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-sam2-cache-writer")
            self._writes.append(self._writer.submit(self.cache.put, key, levels))

    def flush(self) -> None:
        """Wait until every entry handed to the cache is written."""
        with self._lock:
            writes, self._writes = self._writes, []
        for future in writes:
            future.result()

    def __call__(self, t: int) -> FrameFeatures:
        if t in self._ram:
            self._ram.move_to_end(t)
            return self._ram[t]
        kind, value, key = self._take_prefetched(t) or self._load(t, encode_here=True)
        feats = value if kind == "features" else self._encode_raw(value, t, key)
        self._ram[t] = feats
        while len(self._ram) > self.ram_frames:
            self._ram.popitem(last=False)
        return feats

    def prefetch(self, t: int) -> None:
        """Start preparing frame t in the background: read it and look it up in the cache; on a GPU also
        normalise, resize and encode it (on a CPU these would only take the step's cores: measured 5-15 %
        slower at a 256 input on 2 cores)."""
        if t in self._ram or t in self._pending or not 0 <= t < len(self.frames):
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-sam2-prefetch")
        encode = self.model.device.type != "cpu"

        def job():
            with torch.inference_mode():
                return self._load(t, encode_here=encode, background=True)

        self._pending[t] = self._executor.submit(job)

    def _take_prefetched(self, t: int):
        """What the background thread prepared for frame t, or None (none, or it failed: a frame that
        cannot be read in the background, e.g. of an array persisted on a cluster, is read here)."""
        future = self._pending.pop(t, None)
        if future is None:
            return None
        try:
            return future.result()
        except Exception:  # noqa: BLE001 - read again in this thread, where a real error is raised
            return None

    def forget_pending(self) -> None:
        """Drop prefetched frames not used (a propagation stopped early); errors in them are moot."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()

    def precompute(self, frames: Iterable[int] | None = None, progress: Callable[[int], None] | None = None) -> int:
        """Encode ``frames`` (default all) into the feature cache; returns how many were encoded now
        (the others were cached already). ``progress(1)`` is called after each frame."""
        if self.cache is None:
            raise ValueError("precomputing needs a feature cache: pass feature_cache=None (the default folder) or a folder.")
        with retained_heap():
            return self._precompute(list(range(len(self.frames)) if frames is None else frames), progress)

    def _precompute(self, order: list[int], progress: Callable[[int], None] | None) -> int:
        before = self.encoded
        for i, t in enumerate(order):
            if i + 1 < len(order):
                self.prefetch(order[i + 1])
            kind, value, key = self._take_prefetched(t) or self._load(t, encode_here=False)
            if kind == "raw":
                self._encode_raw(value, t, key)
                if len(self._writes) >= MAX_PENDING_WRITES - 1:
                    self.flush()  # precomputing is for the cache: wait for the disk rather than skip a frame
            if progress is not None:
                progress(1)
        self.flush()
        return self.encoded - before

    def clear(self) -> None:
        self.forget_pending()
        self._ram.clear()

    def close(self) -> None:
        self.clear()
        self.flush()
        for pool in (self._executor, self._writer):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._executor = self._writer = None
