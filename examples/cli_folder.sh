#!/usr/bin/env bash
# Segment a folder of time-lapses with the napari-sam2 command: one output per stack, a summary table,
# resumable with --skip-existing. Usage: bash examples/cli_folder.sh [WORKDIR]
#
# Offline (the official checkpoint cannot be downloaded), it runs in demo mode on a random-weight
# checkpoint: everything runs end to end, the masks are meaningless.
set -euo pipefail

WORK=${1:-cli_example}
if command -v napari-sam2 >/dev/null 2>&1; then
    NS2=(napari-sam2)
else
    NS2=(python -m napari_sam2)  # not installed as a command: run the module
fi

# 1. three synthetic 16-bit stacks, a clicks file for each, one corrupt file (reported, the batch goes on)
python - "$WORK" <<'PY'
import sys
from pathlib import Path

import tifffile
from napari_sam2.synthetic import make_timelapse

work = Path(sys.argv[1])
(work / "data").mkdir(parents=True, exist_ok=True)
(work / "prompts").mkdir(exist_ok=True)
for i in range(3):
    ts = make_timelapse(n_frames=6, shape=(128, 128), n_cells=3, seed=i)
    tifffile.imwrite(work / "data" / f"movie{i}.tif", ts.image, imagej=True, metadata={"axes": "TYX"})
    clicks = ts.clicks(0).assign(positive=1)  # one click per cell on frame 0: t, y, x, obj_id, positive
    clicks.to_csv(work / "prompts" / f"movie{i}.csv", index=False)
(work / "data" / "broken.tif").write_bytes(b"II*\x00 not really a TIFF")
clicks.to_csv(work / "prompts" / "broken.csv", index=False)
print(f"wrote {work}/data and {work}/prompts")
PY

# 2. the model: the official checkpoint, or random weights offline
"${NS2[@]}" models
MODEL_ARGS=(--model sam2.1_hiera_tiny)
if ! "${NS2[@]}" download sam2.1_hiera_tiny; then
    echo "DEMO MODE: the pipeline runs end to end but masks are meaningless (random weights)."
    python -c "
import torch, napari_sam2
torch.save({'model': napari_sam2.build_model('sam2.1_hiera_tiny', pretrained=False).state_dict()}, '$WORK/random_tiny.pt')"
    MODEL_ARGS+=(--checkpoint "$WORK/random_tiny.pt" --image-size 256)
fi

# 3. every stack of the folder, clicks from prompts/NAME.csv, Cell Tracking Challenge output
#    (exit status 1 because broken.tif fails; the other stacks complete)
"${NS2[@]}" segment "$WORK"/data/*.tif --out "$WORK/results" --prompts "$WORK/prompts" \
    --format ctc "${MODEL_ARGS[@]}" || echo "(exit status $?: some inputs failed, see the table)"

# 4. resume: finished stacks are skipped
"${NS2[@]}" segment "$WORK"/data/movie*.tif --out "$WORK/results" --prompts "$WORK/prompts" \
    --format ctc --skip-existing --no-progress "${MODEL_ARGS[@]}"

# 5. no prompts: seed every cell of the first frame automatically, OME-Zarr output
"${NS2[@]}" segment "$WORK/data/movie0.tif" --out "$WORK/auto" --auto \
    --auto-param points_per_side=16 --auto-param min_area=20 --auto-param max_objects=50 "${MODEL_ARGS[@]}"

ls "$WORK/results" "$WORK/auto"
