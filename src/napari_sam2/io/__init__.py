"""Image input/output: lazy readers, per-stack normalisation, streaming label writers.

Readers turn TIFF / OME-TIFF / Zarr / OME-Zarr / frame folders / arrays into a
`Stack` (a lazy dask array with named axes); `select` reduces it to a (T, Y, X)
video; `percentile_range` + `normalize_frame` scale intensities once per
stack; writers stream label frames to OME-Zarr, TIFF or Cell Tracking
Challenge folders, appearing under their final name only when complete.
"""

from .atomic import OutputWriteError
from .ctc import check_tracks, read_ctc_tracks, tracks_from_labels, write_ctc
from .normalize import normalize_frame, percentile_range
from .readers import open_stack, select, video_view
from .stack import Stack, StackReadError
from .writers import ZarrLabelsWriter, write_tiff_labels, write_tracks_csv

__all__ = [
    "Stack", "StackReadError", "open_stack", "select", "video_view",
    "percentile_range", "normalize_frame",
    "ZarrLabelsWriter", "write_tiff_labels", "write_ctc", "tracks_from_labels",
    "check_tracks", "read_ctc_tracks", "write_tracks_csv", "OutputWriteError",
]
