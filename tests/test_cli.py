"""The napari-sam2 command: batches with failures, resume, output formats, models, download, Dask.

The network runs with random weights (masks are meaningless): these tests check the plumbing —
files, tables, statuses, exit codes. Stacks are tiny (3-5 frames of 48 x 48, image_size 256).
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

import napari_sam2
from napari_sam2.cli import main
from napari_sam2.io import read_ctc_tracks, tracks_from_labels
from napari_sam2.synthetic import make_timelapse

SRC = str(Path(napari_sam2.__file__).resolve().parents[1])


@pytest.fixture
def data(tmp_path) -> Path:
    """data/s0.tif, data/s1.tif (4 frames, 48 x 48, uint16) and a clicks CSV."""
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        tifffile.imwrite(folder / f"s{i}.tif", make_timelapse(4, (48, 48), n_cells=2, seed=i).image, photometric="minisblack")
    pd.DataFrame({"t": [0, 0], "y": [12, 30], "x": [12, 30], "obj_id": [1, 2]}).to_csv(tmp_path / "clicks.csv", index=False)
    return folder


def _model_args(ckpt) -> list[str]:
    return ["--checkpoint", str(ckpt), "--image-size", "256", "--device", "cpu", "--threads", "1", "--no-progress"]


def _rows(out: Path) -> dict:
    summary = pd.read_csv(out / "summary.csv")
    return {Path(r["input"]).name: r for r in summary.to_dict("records")}


# ------------------------------------------------------------------------------------ batches
def test_batch_reports_failures_goes_on_and_resumes(data, tmp_path, random_checkpoint, capsys):
    good = [str(data / "s0.tif"), str(data / "s1.tif")]
    full = tifffile.imread(good[0])
    tifffile.imwrite(data / "truncated.tif", full, photometric="minisblack")
    raw = (data / "truncated.tif").read_bytes()
    (data / "truncated.tif").write_bytes(raw[: len(raw) // 2])
    (data / "notes.xyz").write_text("not an image")
    out = tmp_path / "out"
    args = ["segment", str(data / "*.tif"), str(data / "notes.xyz"), str(tmp_path / "missing.tif"),
            "--out", str(out), "--prompts", str(tmp_path / "clicks.csv"), "--format", "tiff", *_model_args(random_checkpoint)]
    assert main(args) == 1  # some inputs failed
    printed = capsys.readouterr().out
    assert "5 inputs: 2 ok, 0 skipped, 3 failed" in printed
    rows = _rows(out)
    assert [rows[n]["status"] for n in ("s0.tif", "s1.tif", "truncated.tif", "notes.xyz", "missing.tif")] == \
        ["ok", "ok", "failed", "failed", "failed"]
    assert "corrupt or truncated" in rows["truncated.tif"]["error"]
    assert "unknown image file type '.xyz'" in rows["notes.xyz"]["error"]
    assert "does not exist" in rows["missing.tif"]["error"]
    for line in printed.splitlines():
        if line.startswith(str(data / "truncated.tif")):
            assert "failed" in line and "corrupt or truncated" in line
    for name in ("s0", "s1"):
        labels = tifffile.imread(out / f"{name}.tif")
        assert labels.shape == (4, 48, 48) and rows[f"{name}.tif"]["frames"] == 4 and rows[f"{name}.tif"]["objects"] == 2
        tracks = pd.read_csv(out / f"{name}.tracks.csv")
        assert list(tracks.columns)[:5] == ["t", "label", "y", "x", "area"]
    assert sorted(p.name for p in out.iterdir()) == ["s0.manifest.json", "s0.tif", "s0.tracks.csv",
                                                     "s1.manifest.json", "s1.tif", "s1.tracks.csv", "summary.csv"]

    # resume: finished inputs are skipped; one with no result yet is done
    before = (out / "s0.tif").stat().st_mtime_ns
    for leftover in ("s1.tif", "s1.tracks.csv"):
        (out / leftover).unlink()
    assert main(args + ["--skip-existing"]) == 1
    rows = _rows(out)
    assert rows["s0.tif"]["status"] == "skipped" and rows["s1.tif"]["status"] == "ok"
    assert (out / "s0.tif").stat().st_mtime_ns == before and (out / "s1.tracks.csv").exists()
    # an incomplete result (its tracks gone) is reported and left as it is, not redone over
    (out / "s1.tracks.csv").unlink()
    kept = (out / "s1.tif").read_bytes()
    assert main(args + ["--skip-existing"]) == 1
    rows = _rows(out)
    assert rows["s1.tif"]["status"] == "failed" and "not a complete result" in rows["s1.tif"]["error"]
    assert "s1.tracks.csv is missing" in rows["s1.tif"]["error"] and "--overwrite" in rows["s1.tif"]["error"]
    assert (out / "s1.tif").read_bytes() == kept and rows["s0.tif"]["status"] == "skipped"
    # without --skip-existing or --overwrite, existing outputs are not replaced
    assert main(["segment", good[0], "--out", str(out), "--prompts", str(tmp_path / "clicks.csv"), "--format", "tiff",
                 *_model_args(random_checkpoint)]) == 1
    assert "already exists; use --skip-existing" in capsys.readouterr().out


def test_ctc_output_with_automatic_seeding(data, tmp_path, random_checkpoint, capsys):
    out = tmp_path / "ctc"
    rc = main(["segment", str(data / "s0.tif"), "--out", str(out), "--auto", "--auto-param", "points_per_side=4",
               "--auto-param", "pred_iou_thresh=0", "--auto-param", "stability_score_thresh=0.0",
               "--auto-param", "max_objects=2", "--format", "ctc", *_model_args(random_checkpoint)])
    assert rc == 0, capsys.readouterr()
    res = out / "s0_RES"
    masks = np.stack([tifffile.imread(res / f"mask{t:03d}.tif") for t in range(4)])
    assert masks.dtype == np.uint16
    assert read_ctc_tracks(res / "res_track.txt") == tracks_from_labels(masks)  # consistent with the masks
    tracks = pd.read_csv(out / "s0.tracks.csv")
    assert set(tracks["label"]) == {lab for lab, *_ in read_ctc_tracks(res / "res_track.txt")}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the working store is gone


def test_auto_seeding_that_finds_nothing_is_a_warning(data, tmp_path, random_checkpoint, monkeypatch, capsys):
    from napari_sam2.predictor import amg

    monkeypatch.setattr(amg.AutomaticMaskGenerator, "generate", lambda self, image: [])
    out = tmp_path / "out"
    assert main(["segment", str(data / "s0.tif"), "--out", str(out), "--auto", *_model_args(random_checkpoint)]) == 0
    printed = capsys.readouterr().out
    assert f"warning: {data / 's0.tif'}: the automatic mask generator found no object on frame 0" in printed
    row = _rows(out)["s0.tif"]
    assert row["status"] == "ok" and row["objects"] == 0 and "found no object" in row["warnings"]
    assert not zarr.open_group(str(out / "s0.ome.zarr"), mode="r")["0"][:].any()


def test_zarr_output_prompts_folder_and_frame_folder(data, tmp_path, random_checkpoint):
    frames = tmp_path / "frames"
    frames.mkdir()
    for t, frame in enumerate(make_timelapse(3, (48, 48), n_cells=2, seed=5).image):
        tifffile.imwrite(frames / f"t{t:03d}.tif", frame)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "s0.json").write_text(json.dumps({"points": [[1, 20, 20, 3, 1]], "boxes": [[0, 5, 5, 20, 20, 4]]}))
    labels = np.zeros((48, 48), np.uint16)
    labels[5:15, 5:15] = 7
    tifffile.imwrite(prompts / "frames.tif", labels)  # a label image of one frame for the frame folder
    out = tmp_path / "out"
    rc = main(["segment", str(data / "s0.tif"), str(data / "s1.tif"), str(frames), "--out", str(out),
               "--prompts", str(prompts), *_model_args(random_checkpoint)])
    assert rc == 1
    rows = _rows(out)
    assert rows["s0.tif"]["status"] == "ok" and rows["s0.tif"]["objects"] == 2
    assert rows["frames"]["status"] == "ok" and rows["frames"]["objects"] == 1 and rows["frames"]["frames"] == 3
    assert rows["s1.tif"]["status"] == "failed" and "no prompts file for input" in rows["s1.tif"]["error"]
    store = zarr.open_group(str(out / "s0.ome.zarr"), mode="r")
    assert store["0"].shape == (4, 48, 48) and "multiscales" in store.attrs
    assert set(np.unique(zarr.open_group(str(out / "frames.ome.zarr"), mode="r")["0"][:])) <= {0, 7}


def test_bad_inputs_fail_with_clear_errors(data, tmp_path, random_checkpoint):
    four_d = np.stack([tifffile.imread(data / "s0.tif")] * 2, axis=1)  # (T, C, Y, X)
    tifffile.imwrite(data / "two_channels.tif", four_d, imagej=True, metadata={"axes": "TCYX"})
    late = tmp_path / "late.csv"
    late.write_text("t,y,x,obj_id\n0,10,10,1\n9,10,10,1\n")
    out = tmp_path / "out"
    common = ["--out", str(out), *_model_args(random_checkpoint)]
    assert main(["segment", str(data / "s0.tif"), "--prompts", str(late), *common]) == 1
    assert "'late.csv' line 3: frame t=9 is outside the stack" in _rows(out)["s0.tif"]["error"]
    assert main(["segment", str(data / "s0.tif"), "--prompts", str(tmp_path / "clicks.csv"), "--axes", "TCYX", *common]) == 1
    assert "axes='TCYX' was given" in _rows(out)["s0.tif"]["error"]
    assert main(["segment", str(data / "two_channels.tif"), "--prompts", str(tmp_path / "clicks.csv"), "--channel", "2", *common]) == 1
    assert "channel=2 is out of range: the stack has 2 channels" in _rows(out)["two_channels.tif"]["error"]
    assert not (out / "s0.ome.zarr").exists()


def test_bad_command_lines(data, tmp_path, random_checkpoint, capsys):
    s0 = str(data / "s0.tif")
    with pytest.raises(SystemExit) as exc:
        main(["segment", s0, "--out", str(tmp_path / "o")])  # neither --prompts nor --auto
    assert exc.value.code == 2
    assert "one of the arguments --prompts --auto is required" in capsys.readouterr().err

    def fails(args, message):
        assert main(["segment", s0, *args]) == 1
        assert message in capsys.readouterr().err

    bad = tmp_path / "bad.csv"
    bad.write_text("t,y,id\n0,1,1\n")
    fails(["--out", str(tmp_path / "o"), "--prompts", str(bad)], "points in '" + str(bad) + "' lack column(s) x")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    fails(["--out", str(blocker / "sub"), "--auto"], f"cannot write to the output folder '{blocker / 'sub'}'")
    fails(["--out", str(tmp_path / "o"), "--auto", "--model", "sam3_huge"], "unknown model 'sam3_huge'; choose one of: sam2_hiera_tiny")
    fails(["--out", str(tmp_path / "o"), "--auto", "--image-size", "100"], "--image-size must be a positive multiple of 64")
    fails(["--out", str(tmp_path / "o"), "--auto", "--checkpoint", str(tmp_path / "none.pt")], "checkpoint file")
    fails(["--out", str(tmp_path / "o"), "--auto", "--auto-param", "points_per_sid=3"], "unknown automatic mask generator parameter")
    fails(["--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "nope.csv")], "prompts file")
    fails(["--out", str(tmp_path / "o"), "--auto", "--overwrite", "--skip-existing"], "contradict")
    assert not list(tmp_path.glob("o/*.zarr"))  # nothing was segmented


def test_python_dash_m_help():
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "napari_sam2", "segment", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for option in ("--prompts", "--auto", "--format", "--skip-existing", "--scheduler", "--image-size"):
        assert option in proc.stdout


# ------------------------------------------------------------------------------------ models
class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


def test_models_and_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NAPARI_SAM2_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "version", "size", "cached", "path"]
    table = {line.split()[0]: line.split() for line in lines[1:9]}
    assert len(table) == 8 and table["sam2.1_hiera_large"][1:4] == ["sam2.1", "large", "no"]
    assert table["sam2_hiera_tiny"][4] == str(tmp_path / "cache" / "sam2_hiera_tiny.pt")

    _Handler.payload = b"0123456789" * 100
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("NAPARI_SAM2_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
        assert main(["download", "sam2_hiera_tiny"]) == 0  # the original SAM2 files have no published hash
        assert (tmp_path / "cache" / "sam2_hiera_tiny.pt").read_bytes() == _Handler.payload
        assert main(["download", "sam2_hiera_tiny"]) == 0
        assert "already cached" in capsys.readouterr().out
    finally:
        server.shutdown()
    assert main(["models"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sam2_hiera_tiny "))
    assert row.split()[3:6] == ["(0", "MiB)", "yes"]

    monkeypatch.setenv("NAPARI_SAM2_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: offline
    assert main(["download", "sam2.1_hiera_small"]) == 1
    err = capsys.readouterr().err
    assert "Could not download the sam2.1_hiera_small checkpoint" in err and "yourself" in err
    assert main(["download", "sam9"]) == 1
    assert "unknown model 'sam9'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ Dask
def test_dask_local_cluster(data, tmp_path, random_checkpoint, monkeypatch):
    distributed = pytest.importorskip("distributed")
    # worker processes must import napari_sam2 from this checkout
    monkeypatch.setenv("PYTHONPATH", SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "out"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, silence_logs=40) as cluster:
        rc = main(["segment", str(data / "s0.tif"), str(data / "s1.tif"), str(tmp_path / "missing.tif"),
                   "--out", str(out), "--prompts", str(tmp_path / "clicks.csv"), "--format", "ctc",
                   "--scheduler", cluster.scheduler_address, *_model_args(random_checkpoint)])
    assert rc == 1
    rows = _rows(out)
    assert rows["s0.tif"]["status"] == "ok" and rows["s1.tif"]["status"] == "ok"
    assert rows["missing.tif"]["status"] == "failed"
    for name in ("s0", "s1"):
        res = out / f"{name}_RES"
        masks = np.stack([tifffile.imread(res / f"mask{t:03d}.tif") for t in range(4)])
        assert read_ctc_tracks(res / "res_track.txt") == tracks_from_labels(masks)
        assert (out / f"{name}.tracks.csv").exists()
