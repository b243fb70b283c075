"""Nothing a user has is lost: the napari-sam2 command under bad paths, races, signals and full disks.

Every test runs the command as a user does (a subprocess, real files, real signals, a real second
process holding the lock, a real full file system) and checks that inputs and earlier results are
byte-identical afterwards and that the message names the problem. Random weights: masks are
meaningless, only the plumbing is checked. See docs/cli.md, "What happens when...".
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

import napari_sam2
from napari_sam2.io import write_tracks_csv
from napari_sam2.synthetic import make_timelapse

SRC = str(Path(napari_sam2.__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def cli(*args, env=None, timeout=240, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "napari_sam2", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout, cwd=cwd)


def start(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "napari_sam2", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or ENV)


def model_args(ckpt) -> list:
    return ["--checkpoint", ckpt, "--image-size", "256", "--device", "cpu", "--threads", "1", "--no-progress"]


def snapshot(*roots: Path) -> dict:
    """Every file under ``roots`` (files or folders) with its sha256: what must stay byte-identical."""
    out = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in paths:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write_stack(path: Path, frames: int = 4, seed: int = 0, size=(48, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, make_timelapse(frames, size, n_cells=2, seed=seed).image, photometric="minisblack")
    return path


@pytest.fixture
def clicks(tmp_path) -> Path:
    path = tmp_path / "clicks.csv"
    pd.DataFrame({"t": [0, 0], "y": [12, 30], "x": [12, 30], "obj_id": [1, 2]}).to_csv(path, index=False)
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@contextmanager
def lock_held_elsewhere(out: Path):
    """Another process holding the output folder's lock, as a running napari-sam2 would."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from napari_sam2.io.lock import OutputLock; "
         f"OutputLock({str(out / '.napari-sam2.lock')!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def rows(out: Path) -> dict:
    """The newest summary row per input file name."""
    return {Path(r["input"]).name: r for r in pd.read_csv(out / "summary.csv").to_dict("records")}


# ------------------------------------------------------------------------------ inputs are never outputs
@pytest.mark.parametrize("fmt,flag", [("tiff", "--skip-existing"), ("tiff", "--overwrite"), ("zarr", "--overwrite"),
                                      ("zarr", "--skip-existing")])
def test_output_onto_the_input_is_refused(tmp_path, clicks, random_checkpoint, fmt, flag):
    io = tmp_path / "io"
    if fmt == "tiff":
        source = write_stack(io / "good.tif")
    else:  # an OME-Zarr input whose labels output would have the same name
        source = io / "movie.ome.zarr"
        zarr.save_array(str(source / "0"), make_timelapse(4, (48, 48), n_cells=2).image, zarr_format=2)
    before = snapshot(io)
    proc = cli("segment", source, "--out", io, "--format", fmt, "--prompts", clicks, flag, *model_args(random_checkpoint))
    assert proc.returncode == 1
    assert "would overwrite the input" in proc.stderr and str(source) in proc.stderr and "Nothing was done" in proc.stderr
    assert snapshot(io) == before and sorted(p.name for p in io.iterdir()) == [source.name]


def test_output_folder_inside_an_input_store_is_refused(tmp_path, clicks, random_checkpoint):
    store = tmp_path / "movie.zarr"
    zarr.save_array(str(store), make_timelapse(4, (48, 48), n_cells=2).image, zarr_format=2)
    before = snapshot(store)
    proc = cli("segment", store, "--out", store / "results", "--prompts", clicks, *model_args(random_checkpoint))
    assert proc.returncode == 1 and "is inside the input" in proc.stderr
    assert snapshot(store) == before and not (store / "results").exists()


def test_prompts_file_in_the_way_of_an_output_is_refused(tmp_path, random_checkpoint):
    source = write_stack(tmp_path / "data" / "s0.tif")
    out = tmp_path / "out"
    out.mkdir()
    prompts = out / "s0.tracks.csv"  # the user keeps clicks under the name of an output
    prompts.write_text("t,y,x,obj_id\n0,12,12,1\n")
    before = snapshot(prompts)
    proc = cli("segment", source, "--out", out, "--prompts", prompts, "--overwrite", *model_args(random_checkpoint))
    assert proc.returncode == 1 and "would overwrite the input" in proc.stderr
    assert snapshot(prompts) == before


# ------------------------------------------------------------------------------ complete results only
def test_skip_existing_never_takes_mixed_results_and_never_deletes(tmp_path, clicks, random_checkpoint):
    a, b = write_stack(tmp_path / "a" / "movie.tif", seed=1), write_stack(tmp_path / "b" / "movie.tif", seed=2)
    out_a, out_b = tmp_path / "out_a", tmp_path / "out_b"
    for source, out in ((a, out_a), (b, out_b)):
        assert cli("segment", source, "--out", out, "--prompts", clicks, *model_args(random_checkpoint)).returncode == 0
    manifest = json.loads((out_a / "movie.manifest.json").read_text())
    assert manifest["input"] == str(a) and manifest["files"]["labels"]["path"] == "movie.ome.zarr"
    assert manifest["objects"] == 2 and manifest["frames"] == 4 and manifest["run"]

    # the tracks of run b beside the labels of run a: not a finished result, and nothing is replaced
    (out_a / "movie.tracks.csv").write_bytes((out_b / "movie.tracks.csv").read_bytes())
    before = snapshot(out_a)
    proc = cli("segment", a, "--out", out_a, "--prompts", clicks, "--skip-existing", *model_args(random_checkpoint))
    assert proc.returncode == 1
    error = rows(out_a)["movie.tif"]["error"]
    assert "not a complete result" in error and "movie.tracks.csv was changed" in error and "--overwrite" in error
    assert {k: v for k, v in snapshot(out_a).items() if not k.endswith("summary.csv")} == \
        {k: v for k, v in before.items() if not k.endswith("summary.csv")}

    # another input that maps to the same output name is not "already done"
    proc = cli("segment", b, "--out", out_a, "--prompts", clicks, "--skip-existing", *model_args(random_checkpoint))
    assert proc.returncode == 1 and "not a complete result" in rows(out_a)["movie.tif"]["error"]

    # --overwrite replaces the whole set, and the result is complete again
    assert cli("segment", a, "--out", out_a, "--prompts", clicks, "--overwrite", *model_args(random_checkpoint)).returncode == 0
    proc = cli("segment", a, "--out", out_a, "--prompts", clicks, "--skip-existing", *model_args(random_checkpoint))
    assert proc.returncode == 0 and rows(out_a)["movie.tif"]["status"] == "skipped"


def test_a_second_run_on_the_same_output_says_who_holds_it(tmp_path, clicks, random_checkpoint):
    source = write_stack(tmp_path / "data" / "s0.tif")
    out = tmp_path / "out"
    out.mkdir()
    with lock_held_elsewhere(out) as holder:
        proc = cli("segment", source, "--out", out, "--prompts", clicks, *model_args(random_checkpoint))
        assert proc.returncode == 1
        assert "is being written by another napari-sam2 run" in proc.stderr and f"process {holder.pid}" in proc.stderr
        assert not (out / "s0.ome.zarr").exists() and not (out / "summary.csv").exists()
    # the lock dies with its holder: no stale lock to remove by hand
    assert cli("segment", source, "--out", out, "--prompts", clicks, *model_args(random_checkpoint)).returncode == 0


def test_two_concurrent_runs_leave_one_consistent_result(tmp_path, clicks, random_checkpoint):
    a, b = write_stack(tmp_path / "a" / "movie.tif", seed=1), write_stack(tmp_path / "b" / "movie.tif", seed=2)
    out = tmp_path / "out"
    runs = [start("segment", s, "--out", out, "--prompts", clicks, "--overwrite", *model_args(random_checkpoint))
            for s in (a, b)]
    finished = [(p.wait(timeout=240), p.stderr.read()) for p in runs]
    assert any(rc == 0 for rc, _ in finished)
    for rc, err in finished:
        assert rc == 0 or "being written by another napari-sam2 run" in err
    manifest = json.loads((out / "movie.manifest.json").read_text())
    labels = zarr.open_group(str(out / "movie.ome.zarr"), mode="r")["0"][:]
    tracks = pd.read_csv(out / "movie.tracks.csv")
    for row in tracks.itertuples():  # the tracks describe exactly these labels
        assert int((labels[row.t] == row.label).sum()) == row.area
    assert manifest["input"] in (str(a), str(b))
    assert cli("segment", manifest["input"], "--out", out, "--prompts", clicks, "--skip-existing",
               *model_args(random_checkpoint)).returncode == 0


def test_summary_keeps_every_run(tmp_path, clicks, random_checkpoint):
    first, second = write_stack(tmp_path / "data" / "s0.tif"), write_stack(tmp_path / "data" / "s1.tif", seed=1)
    out = tmp_path / "out"
    assert cli("segment", first, "--out", out, "--prompts", clicks, *model_args(random_checkpoint)).returncode == 0
    earlier = (out / "summary.csv").read_bytes()
    assert cli("segment", first, second, "--out", out, "--prompts", clicks, "--skip-existing",
               *model_args(random_checkpoint)).returncode == 0
    assert (out / "summary.csv").read_bytes().startswith(earlier)  # the first run's record is untouched
    table = pd.read_csv(out / "summary.csv")
    assert list(table.columns[:4]) == ["run", "finished", "input", "status"]
    assert table["run"].nunique() == 2 and list(table["status"]) == ["ok", "skipped", "ok"]
    # what the summary says is on disk is on disk
    for row in table.itertuples():
        assert Path(row.output).exists()


# ------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize("content,name", [('{"points": []}', "empty.json"), ("t,y,x,obj_id\n", "empty.csv"),
                                          ('{"points": [], "boxes": []}', "none.json")])
def test_a_prompts_file_without_prompts_is_an_error(tmp_path, random_checkpoint, content, name):
    source = write_stack(tmp_path / "data" / "s0.tif")
    prompts = tmp_path / name
    prompts.write_text(content)
    out = tmp_path / "out"
    proc = cli("segment", source, "--out", out, "--prompts", prompts, *model_args(random_checkpoint))
    assert proc.returncode == 1 and "holds no prompt" in proc.stderr and "--auto" in proc.stderr
    assert not out.exists()  # nothing seeded automatically, nothing written


def test_an_empty_label_image_prompt_is_an_error(tmp_path, random_checkpoint):
    source = write_stack(tmp_path / "data" / "s0.tif")
    prompts = tmp_path / "mask.tif"
    tifffile.imwrite(prompts, np.zeros((48, 48), np.uint16))
    proc = cli("segment", source, "--out", tmp_path / "out", "--prompts", prompts, *model_args(random_checkpoint))
    assert proc.returncode == 1 and "holds no prompt" in proc.stderr


# ------------------------------------------------------------------------------ interrupts and leftovers
def _spill_dirs(tmp: Path, pid: int | None = None) -> list[Path]:
    return [p for p in tmp.glob("napari-sam2-spill-*") if pid is None or f"-{pid}@" in p.name]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.fixture
def long_run(tmp_path):
    """A 30-frame stack prompted on frame 1 (tracked both ways: its history spills to disk) and a
    TMPDIR of its own, so that spill folders can be watched."""
    source = write_stack(tmp_path / "data" / "long.tif", frames=30)
    prompts = tmp_path / "mid.csv"
    prompts.write_text("t,y,x,obj_id\n1,12,12,1\n1,30,30,2\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return source, prompts, tmp, {**ENV, "TMPDIR": str(tmp)}


def test_sigterm_cleans_up_and_keeps_finished_results(tmp_path, clicks, random_checkpoint, long_run):
    source, prompts, tmp, env = long_run
    done_first = write_stack(tmp_path / "data" / "a_short.tif")
    prompt_dir = tmp_path / "prompts"
    prompt_dir.mkdir()
    (prompt_dir / "a_short.csv").write_bytes(clicks.read_bytes())
    (prompt_dir / "long.csv").write_bytes(prompts.read_bytes())
    out = tmp_path / "out"
    proc = start("segment", done_first, source, "--out", out, "--prompts", prompt_dir, *model_args(random_checkpoint),
                 env=env)
    _wait_for(lambda: any(any(d.rglob("*.pt")) for d in _spill_dirs(tmp, proc.pid)), proc)  # frames spilled
    kept = snapshot(out / "a_short.ome.zarr", out / "a_short.tracks.csv")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "terminated (SIGTERM)" in err and "--skip-existing" in err
    assert _spill_dirs(tmp) == []
    assert not [p for p in out.iterdir() if ".partial-" in p.name] and not (out / "long.ome.zarr").exists()
    assert snapshot(out / "a_short.ome.zarr", out / "a_short.tracks.csv") == kept
    assert rows(out)["a_short.tif"]["status"] == "ok" and "long.tif" not in rows(out)


def test_leftovers_of_a_killed_run_are_removed_by_the_next_run(tmp_path, clicks, random_checkpoint, long_run):
    source, prompts, tmp, env = long_run
    out = tmp_path / "out"
    proc = start("segment", source, "--out", out, "--prompts", prompts, *model_args(random_checkpoint), env=env)
    _wait_for(lambda: any(any(d.rglob("*.pt")) for d in _spill_dirs(tmp, proc.pid)), proc)
    proc.kill()  # SIGKILL: nothing can be cleaned up on the way out
    proc.wait()
    assert [p for p in out.iterdir() if ".partial-" in p.name] and _spill_dirs(tmp, proc.pid)
    other_host = out / ".x.ome.zarr.partial-1@abcdef-0123abcd"  # another machine's: left alone
    other_host.mkdir()
    alive = tmp / f"napari-sam2-spill-{os.getpid()}@{_host()}-keep"  # a live process's: left alone
    alive.mkdir()
    # the next run, on a short stack tracked both ways (it spills too, so it sweeps the temp folder)
    short = write_stack(tmp_path / "data" / "short.tif")
    assert cli("segment", short, "--out", out, "--prompts", prompts, *model_args(random_checkpoint),
               env=env).returncode == 0
    assert [p for p in out.iterdir() if ".partial-" in p.name] == [other_host]
    assert _spill_dirs(tmp) == [alive]


def _host() -> str:
    from napari_sam2.io.owner import owner_tag

    return owner_tag().split("@")[1]


def test_a_dead_runs_partial_is_removed_but_not_results(tmp_path, clicks, random_checkpoint):
    source = write_stack(tmp_path / "data" / "s0.tif")
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".s0.ome.zarr.partial-{dead_pid()}@{_host()}-0123abcd"
    stale.mkdir()
    (stale / "chunk").write_bytes(b"x" * 100)
    mine = out / "notes.partial-keep.txt"  # a user file that merely looks similar
    mine.write_text("keep")
    assert cli("segment", source, "--out", out, "--prompts", clicks, *model_args(random_checkpoint)).returncode == 0
    assert not stale.exists() and mine.read_text() == "keep"


def test_a_fifo_input_is_refused_without_hanging(tmp_path, clicks, random_checkpoint):
    fifo = tmp_path / "pipe.tif"
    os.mkfifo(fifo)
    proc = cli("segment", fifo, "--out", tmp_path / "out", "--prompts", clicks, *model_args(random_checkpoint),
               timeout=120)
    assert proc.returncode == 1 and "not a regular file" in proc.stdout + proc.stderr


def test_a_fifo_as_prompts_or_checkpoint_is_refused_without_hanging(tmp_path, random_checkpoint):
    source = write_stack(tmp_path / "data" / "s0.tif")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    proc = cli("segment", source, "--out", tmp_path / "out", "--prompts", fifo, *model_args(random_checkpoint),
               timeout=60)
    assert proc.returncode == 1 and "named pipe (FIFO), not a regular file" in proc.stderr
    proc = cli("segment", source, "--out", tmp_path / "out", "--auto", "--checkpoint", fifo, "--device", "cpu",
               timeout=60)
    assert proc.returncode == 1 and "named pipe (FIFO), not a regular file" in proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ clear messages
def test_bad_auto_param_value_fails_before_the_model_loads(tmp_path, random_checkpoint):
    source = write_stack(tmp_path / "data" / "s0.tif")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")  # loading it would fail: the message proves it was not loaded
    proc = cli("segment", source, "--out", tmp_path / "out", "--auto", "--auto-param", "points_per_side=abc",
               "--checkpoint", broken, "--device", "cpu")
    assert proc.returncode == 1
    assert "--auto-param: automatic mask generator parameter points_per_side must be an integer" in proc.stderr
    assert "'abc'" in proc.stderr and not (tmp_path / "out").exists()


def test_existing_regular_file_in_place_of_a_store_fails_first(tmp_path, clicks, random_checkpoint):
    source = write_stack(tmp_path / "data" / "s0.tif")
    out = tmp_path / "out"
    out.mkdir()
    (out / "s0.ome.zarr").write_text("my notes")
    proc = cli("segment", source, "--out", out, "--prompts", clicks, "--overwrite", *model_args(random_checkpoint))
    assert proc.returncode == 1
    assert f"'{out / 's0.ome.zarr'}' exists and is a regular file" in proc.stderr and "Nothing was done" in proc.stderr
    assert (out / "s0.ome.zarr").read_text() == "my notes" and sorted(p.name for p in out.iterdir()) == ["s0.ome.zarr"]


def test_volume_options_of_the_command_line(tmp_path, clicks, random_checkpoint):
    volume = make_timelapse(3, (48, 48), n_cells=2).image
    path = tmp_path / "tzyx.tif"
    tifffile.imwrite(path, np.stack([volume, volume // 2], axis=1), imagej=True, metadata={"axes": "TZYX"})
    out = tmp_path / "out"
    proc = cli("segment", path, "--out", out, "--prompts", clicks, *model_args(random_checkpoint))
    assert proc.returncode == 1
    error = rows(out)["tzyx.tif"]["error"]
    assert "--z N" in error and "--z-project max" in error and "--along Z" in error
    assert cli("segment", path, "--out", out, "--prompts", clicks, "--z", 1, "--overwrite",
               *model_args(random_checkpoint)).returncode == 0
    assert zarr.open_group(str(out / "tzyx.ome.zarr"), mode="r")["0"].shape == (3, 48, 48)
    assert cli("segment", path, "--out", out, "--prompts", clicks, "--z-project", "max", "--format", "tiff", "--overwrite",
               *model_args(random_checkpoint)).returncode == 0
    assert cli("segment", path, "--out", tmp_path / "out_z", "--prompts", clicks, "--along", "z", "--t", 2,
               *model_args(random_checkpoint)).returncode == 0
    assert zarr.open_group(str(tmp_path / "out_z" / "tzyx.ome.zarr"), mode="r")["0"].shape == (2, 48, 48)


def test_checkpoint_folder_and_failed_model_load(tmp_path, random_checkpoint):
    source = write_stack(tmp_path / "data" / "s0.tif")
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "sam2.1_hiera_tiny.pt").write_bytes(random_checkpoint.read_bytes())
    out = tmp_path / "out"
    proc = cli("segment", source, "--out", out, "--auto", "--checkpoint", folder, "--device", "cpu")
    assert proc.returncode == 1 and f"checkpoint '{folder}' is a folder, not a file" in proc.stderr
    assert str(folder / "sam2.1_hiera_tiny.pt") in proc.stderr
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00" * 64)
    proc = cli("segment", source, "--out", out, "--auto", "--checkpoint", broken, "--device", "cpu")
    assert proc.returncode == 1 and "could not load model" in proc.stderr
    assert not out.exists()  # no empty output folder left behind


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, check=False).returncode == 0


def test_disk_full_names_the_output_and_keeps_earlier_results(tmp_path, clicks, random_checkpoint):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "4m"):
        pytest.skip("needs root to mount a small tmpfs (a real full disk)")
    try:
        source = write_stack(tmp_path / "data" / "big.tif", frames=3, size=(512, 512))
        out = disk / "out"
        out.mkdir()
        earlier = write_tracks_csv(out / "earlier.tracks.csv", pd.DataFrame({"t": [0], "label": [1]}))
        before = snapshot(earlier)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\x00" * (free - 8 * 1024))  # two pages left
        proc = cli("segment", source, "--out", out, "--prompts", clicks, "--format", "tiff",
                   *model_args(random_checkpoint))
        assert proc.returncode == 1
        error = rows(out)["big.tif"]["error"] if (out / "summary.csv").exists() else proc.stdout
        assert "No space left on device" in error and str(out / "big") in error
        assert ".partial-" not in error and "free some disk space" in error
        assert snapshot(earlier) == before
        assert not [p for p in out.iterdir() if p.name.startswith(".") or p.name.startswith("big")]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ------------------------------------------------------------------------------ hostile or damaged files
def test_missing_or_corrupt_zarr_chunk_is_an_error_naming_store_and_frame(tmp_path, clicks, random_checkpoint):
    store = tmp_path / "movie.zarr"
    frames = make_timelapse(5, (48, 48), n_cells=2).image
    zarr.create_array(str(store), data=frames, chunks=(1, 48, 48), zarr_format=3)
    chunk = store / "c" / "2" / "0" / "0"
    assert chunk.is_file()
    chunk.unlink()  # an interrupted copy
    before = snapshot(store)
    out = tmp_path / "out"
    assert cli("segment", store, "--out", out, "--prompts", clicks, *model_args(random_checkpoint)).returncode == 1
    error = rows(out)["movie.zarr"]["error"]
    assert f"zarr store '{store}'" in error and "frame 2 has no data on disk" in error
    assert snapshot(store) == before and not (out / "movie.ome.zarr").exists()
    (store / "c" / "3" / "0" / "0").write_bytes(b"garbage, not zstd")  # a damaged chunk
    chunk.parent.mkdir(parents=True, exist_ok=True)
    chunk.write_bytes((store / "c" / "1" / "0" / "0").read_bytes())
    assert cli("segment", store, "--out", out, "--prompts", clicks, *model_args(random_checkpoint)).returncode == 1
    error = rows(out)["movie.zarr"]["error"]
    assert f"zarr store '{store}'" in error and "frame 3 is corrupt" in error


@pytest.fixture
def cache(tmp_path) -> tuple[Path, dict]:
    folder = tmp_path / "cache"
    folder.mkdir()
    return folder, {**ENV, "NAPARI_SAM2_CACHE": str(folder)}


def test_a_cached_file_that_is_not_the_official_checkpoint(tmp_path, random_checkpoint, cache):
    folder, env = cache
    impostor = folder / "sam2.1_hiera_tiny.pt"
    impostor.write_bytes(random_checkpoint.read_bytes())  # right name, wrong file
    before = snapshot(impostor)
    proc = cli("models", env=env, cwd=tmp_path)
    assert proc.returncode == 0 and "not the official file" in proc.stderr.lower()
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("sam2.1_hiera_tiny "))
    assert " BAD " in line and " yes " not in line
    proc = cli("download", "sam2.1_hiera_tiny", env=env, cwd=tmp_path)
    assert proc.returncode == 1 and "is not the official sam2.1_hiera_tiny checkpoint" in proc.stderr
    assert "--force" in proc.stderr
    source = write_stack(tmp_path / "data" / "s0.tif")
    proc = cli("segment", source, "--out", tmp_path / "out", "--auto", "--image-size", "256", "--device", "cpu",
               env=env, cwd=tmp_path)
    assert proc.returncode == 1 and "is not the official sam2.1_hiera_tiny checkpoint" in proc.stderr
    assert snapshot(impostor) == before and not (tmp_path / "out").exists()


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    subprocess.run([sys.executable, "-c", f"""
import os, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
torch.save({{"model": {{"w": torch.zeros(1)}}, "extra": Evil()}}, {str(evil)!r})
"""], check=True, env=ENV)
    source = write_stack(tmp_path / "data" / "s0.tif")
    proc = cli("segment", source, "--out", tmp_path / "out", "--auto", "--checkpoint", evil, "--device", "cpu")
    assert proc.returncode == 1 and "contains executable code" in proc.stderr and "will not be loaded" in proc.stderr
    assert "weights_only" not in proc.stderr and not marker.exists()


def test_a_checkpoint_with_nan_weights_is_refused_naming_them(tmp_path, random_checkpoint):
    import torch

    sd = torch.load(random_checkpoint, weights_only=True)["model"]
    sd["sam_mask_decoder.iou_prediction_head.layers.0.weight"][0, 0] = float("nan")
    sd["obj_ptr_proj.layers.0.bias"][1] = float("inf")
    bad = tmp_path / "diverged.pt"
    torch.save({"model": sd}, bad)
    source = write_stack(tmp_path / "data" / "s0.tif")
    proc = cli("segment", source, "--out", tmp_path / "out", "--auto", "--checkpoint", bad, "--device", "cpu")
    assert proc.returncode == 1 and "2 tensors hold NaN or infinite values" in proc.stderr
    assert "sam_mask_decoder.iou_prediction_head.layers.0.weight" in proc.stderr
    assert "obj_ptr_proj.layers.0.bias" in proc.stderr and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ found by probing as a user
def test_a_folder_or_link_named_summary_csv_is_left_alone(tmp_path, clicks, random_checkpoint):
    source = write_stack(tmp_path / "data" / "s0.tif")
    out = tmp_path / "out"
    (out / "summary.csv").mkdir(parents=True)
    (out / "summary.csv" / "notes.txt").write_text("precious")
    proc = cli("segment", source, "--out", out, "--prompts", clicks, *model_args(random_checkpoint))
    assert proc.returncode == 0 and "is not a regular file: it was left alone" in proc.stderr
    assert (out / "summary.csv" / "notes.txt").read_text() == "precious"
    written = [p for p in out.glob("summary.*.csv")]
    assert len(written) == 1 and pd.read_csv(written[0])["status"].tolist() == ["ok"]


def test_a_lock_file_that_is_a_link_is_never_written_through(tmp_path, clicks, random_checkpoint):
    source = write_stack(tmp_path / "data.tif")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".napari-sam2.lock").symlink_to(source)
    before = snapshot(source)
    proc = cli("segment", source, "--out", out, "--prompts", clicks, *model_args(random_checkpoint))
    assert proc.returncode == 1 and "will not write through it" in proc.stderr
    assert snapshot(source) == before


def test_an_unexpanded_tilde_in_out_is_the_home_folder(tmp_path, clicks, random_checkpoint):
    home = tmp_path / "home"
    source = write_stack(home / "data" / "s0.tif")
    before = snapshot(home)
    proc = cli("segment", source, "--out=~/data", "--format", "tiff", "--prompts", clicks,
               *model_args(random_checkpoint), env={**ENV, "HOME": str(home)}, cwd=tmp_path)
    assert proc.returncode == 1 and "would overwrite the input" in proc.stderr
    assert snapshot(home) == before and not (tmp_path / "~").exists()
    proc = cli("segment", source, "--out=~/results", "--prompts", clicks, *model_args(random_checkpoint),
               env={**ENV, "HOME": str(home)}, cwd=tmp_path)
    assert proc.returncode == 0 and (home / "results" / "s0.ome.zarr").is_dir()


def test_skip_existing_redoes_nothing_stale_and_accepts_copies(tmp_path, clicks, random_checkpoint):
    source = write_stack(tmp_path / "data" / "m.tif")
    out = tmp_path / "out"
    assert cli("segment", source, "--out", out, "--prompts", clicks, *model_args(random_checkpoint)).returncode == 0
    # a copy of the results (cp -a: new inodes, same times) and the input through a linked folder: still done
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(out), str(copy)], check=True)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    proc = cli("segment", tmp_path / "link" / "m.tif", "--out", copy, "--prompts", clicks, "--skip-existing",
               *model_args(random_checkpoint))
    assert proc.returncode == 0 and rows(copy)["m.tif"]["status"] == "skipped"
    # other prompts, another image size: not the same result
    other = tmp_path / "other.csv"
    other.write_text("t,y,x,obj_id\n0,20,20,1\n")
    for extra, why in ((["--prompts", other], "other settings (prompts"),
                       (["--prompts", clicks, "--image-size", "512"], "other settings (options")):
        proc = cli("segment", source, "--out", out, "--skip-existing", *model_args(random_checkpoint)[:2],
                   *extra, *(["--image-size", "256"] if "512" not in extra else []), "--device", "cpu",
                   "--no-progress")
        assert proc.returncode == 1 and why in rows(out)["m.tif"]["error"], rows(out)["m.tif"]["error"]
    # the input edited in place: its result is out of date
    write_stack(source, seed=3)
    proc = cli("segment", source, "--out", out, "--prompts", clicks, "--skip-existing", *model_args(random_checkpoint))
    assert proc.returncode == 1 and "was changed after the result was made" in rows(out)["m.tif"]["error"]


def test_any_next_run_removes_spill_folders_of_dead_processes(tmp_path, clicks, random_checkpoint):
    tmp = tmp_path / "tmp"
    stale = tmp / f"napari-sam2-spill-{dead_pid()}@{_host()}-abc"
    (stale / "obj00000").mkdir(parents=True)
    (stale / "obj00000" / "0000001.pt").write_bytes(b"x" * 1000)
    source = write_stack(tmp_path / "data" / "s0.tif")  # prompted on frame 0: this run spills nothing
    assert cli("segment", source, "--out", tmp_path / "out", "--prompts", clicks, *model_args(random_checkpoint),
               env={**ENV, "TMPDIR": str(tmp)}).returncode == 0
    assert not stale.exists()


def test_the_lock_is_checked_before_the_model_loads(tmp_path, clicks):
    source = write_stack(tmp_path / "data" / "s0.tif")
    out = tmp_path / "out"
    out.mkdir()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00" * 64)  # loading it would fail: a lock message proves it was not loaded
    with lock_held_elsewhere(out):
        proc = cli("segment", source, "--out", out, "--prompts", clicks, "--checkpoint", broken, "--device", "cpu")
        assert proc.returncode == 1 and "is being written by another napari-sam2 run" in proc.stderr


def test_a_pattern_that_matches_earlier_results_is_refused_clearly(tmp_path, clicks, random_checkpoint):
    data = tmp_path / "data"
    write_stack(data / "a.tif")
    assert cli("segment", data / "a.tif", "--out", data, "--format", "tiff", "--prompts", clicks, "--z-project",
               "max", *model_args(random_checkpoint)).returncode == 1  # a.tif would be replaced: refused
    out = tmp_path / "out"
    assert cli("segment", data / "a.tif", "--out", out, "--format", "tiff", "--prompts", clicks,
               *model_args(random_checkpoint)).returncode == 0
    before = snapshot(out)
    proc = cli("segment", out / "*.tif", "--out", out, "--prompts", clicks, *model_args(random_checkpoint))
    assert proc.returncode == 1 and "is a result of an earlier napari-sam2 run (listed in a.manifest.json)" in proc.stderr
    assert snapshot(out) == before


def test_two_inputs_reaching_one_prompts_file_is_an_error(tmp_path, clicks, random_checkpoint):
    a, b, c = (write_stack(tmp_path / p) for p in ("a/s0.tif", "b/s0.tif", "a_s0.tif"))
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name in ("s0.csv", "a_s0.csv"):
        (prompts / name).write_bytes(clicks.read_bytes())
    proc = cli("segment", a, b, c, "--out", tmp_path / "out", "--prompts", prompts, *model_args(random_checkpoint))
    assert proc.returncode == 1 and "would both take their prompts from" in proc.stderr
    assert not (tmp_path / "out").exists()
