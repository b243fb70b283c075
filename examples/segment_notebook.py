# %% [markdown]
# # Segmenting and tracking a time-lapse from a notebook
#
# A notebook as a script: run it top to bottom (`python examples/segment_notebook.py`) or cell by
# cell (`# %%` cells open as a notebook in VS Code, or with `jupytext --to notebook`).
#
# It writes a synthetic 16-bit time-lapse to a TIFF file, prompts cells with clicks (one negative
# click included), a box and a painted mask, segments with `napari_sam2.segment_stack`, inspects the
# tracks and object scores, saves the labels as OME-Zarr, ImageJ TIFF and a Cell Tracking Challenge
# folder, and segments more stacks reusing the loaded model. Offline, it falls back to random weights
# (demo mode: everything runs, the masks are meaningless).

# %%
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

import napari_sam2
from napari_sam2.build import resolve_device
from napari_sam2.checkpoints import CheckpointError, resolve_checkpoint
from napari_sam2.synthetic import make_timelapse

WORK = Path(sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "notebook_output")
WORK.mkdir(exist_ok=True)
MODEL = "sam2.1_hiera_tiny"
DEVICE = "auto"  # cuda > mps > cpu

# %% [markdown]
# ## Data: a 16-bit time-lapse on disk

# %%
ts = make_timelapse(n_frames=8, shape=(192, 192), n_cells=4, seed=1)
movie = WORK / "movie.tif"
tifffile.imwrite(movie, ts.image, imagej=True, metadata={"axes": "TYX"})
print(movie, ts.image.shape, ts.image.dtype)
print(ts.lineage_table())

# %% [markdown]
# ## The model, loaded once and reused
#
# `segment_stack(..., model=MODEL)` would load it on every call; a ready predictor is reused.

# %%
try:
    predictor = napari_sam2.build_video_predictor(MODEL, checkpoint=resolve_checkpoint(MODEL), device=DEVICE)
    DEMO = False
except CheckpointError as exc:
    print(f"{exc}\nDEMO MODE: the pipeline runs end to end but masks are meaningless (random weights).")
    net = napari_sam2.build_model(MODEL, pretrained=False, device=resolve_device(DEVICE), image_size=512)
    predictor = napari_sam2.VideoPredictor(net)
    DEMO = True

# %% [markdown]
# ## Prompts, in napari's (t, y, x) order
#
# - clicks as a table: `obj_id` says which object a click belongs to, `positive` 0 marks a click on
#   background (here: next to cell 1, to keep its mask from leaking);
# - a box `(t, y0, x0, y1, x1, obj_id)` around cell 2 on frame 0;
# - a painted label image of frame 3: its label 4 becomes the mask prompt of object 4.

# %%
first = ts.clicks(0, labels=[1]).iloc[0]  # the pixel of cell 1 nearest its centroid, on frame 0
y1, x1 = float(first.y), float(first.x)
clicks = pd.DataFrame({
    "t": [0, 0],
    "y": [y1, min(y1 + 20, 191)],
    "x": [x1, x1],
    "obj_id": [1, 1],
    "positive": [1, 0],
})
ys, xs = np.nonzero(ts.labels[0] == 2)
boxes = [[0, ys.min(), xs.min(), ys.max(), xs.max(), 2]]
painted = np.where(ts.labels[3] == 4, 4, 0)
print(clicks)

# %% [markdown]
# ## Segment: labels stream to an OME-Zarr store as they are made

# %%
result = napari_sam2.segment_stack(
    movie,
    points=clicks,
    boxes=boxes,
    masks=painted,
    mask_frame=3,
    predictor=predictor,
    direction="both",  # forward from frame 0, backward from frame 3
    out=WORK / "movie_labels.ome.zarr",
    overwrite=True,
)
print(result)

# %% [markdown]
# ## Tracks and object scores
#
# One row per object and frame; `score` is SAM2's object-present logit (> 0: the object is there).

# %%
print(result.tracks.head(12).to_string(index=False))
print(result.scores_table().round(2))
if len(result.tracks):
    print(result.tracks.pivot(index="t", columns="label", values="area"))

# %% [markdown]
# ## Save: ImageJ TIFF, Cell Tracking Challenge folder, tracks CSV

# %%
print(result.to_tiff(WORK / "movie_labels.tif", overwrite=True))
print(result.to_ctc(WORK / "movie_RES", overwrite=True))
print(result.to_csv(WORK / "movie_tracks.csv", overwrite=True))

# %% [markdown]
# ## More stacks, same model; no prompt = automatic seeding on the first frame
#
# Without prompts, the automatic mask generator seeds objects on frame 0 (`auto=` takes its
# parameters, plus `max_objects`) and every seeded object is tracked.

# %%
for seed in (2, 3):
    other = make_timelapse(n_frames=6, shape=(128, 128), n_cells=3, seed=seed)
    auto = napari_sam2.segment_stack(other.image, predictor=predictor, progress=False,
                                     auto=dict(points_per_side=8, min_area=30, max_objects=10))
    print(f"seed {seed}: {auto.n_objects} objects seeded, {len(auto.tracks)} track rows")

# %% [markdown]
# ## Look at it in napari (when a display is available)

# %%
if "--napari" in sys.argv:
    import napari

    viewer = napari.Viewer()
    viewer.add_image(ts.image, name="movie")
    viewer.add_labels(np.asarray(result.labels), name="SAM2")
    viewer.add_tracks(napari_sam2.tracking.napari_tracks(result.tracks), name="tracks")
    napari.run()
