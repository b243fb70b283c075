"""Bad checkpoints on disk: unofficial cached files, code in pickles, NaN weights, odd paths.

Every test uses real files and checks that the user's file is byte-identical afterwards and that
the message names the problem and the fix.
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import torch

from napari_sam2 import checkpoints as ckpt
from napari_sam2.build import build_model
from napari_sam2.checkpoints import REGISTRY, CheckpointError, HashMismatchError

NAME = "sam2.1_hiera_tiny"
FILENAME = f"{NAME}.pt"
CONTENT = b"pretend checkpoint bytes " * 40
CONTENT_SHA = hashlib.sha256(CONTENT).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder and a cwd whose ./model does not exist yet."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("NAPARI_SAM2_CACHE", str(folder))
    monkeypatch.delenv("NAPARI_SAM2_BASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    return folder


@pytest.fixture
def official(monkeypatch):
    """Make CONTENT the 'official' NAME file (the real sha256 belongs to the real file)."""
    monkeypatch.setitem(REGISTRY, NAME, dataclasses.replace(REGISTRY[NAME], sha256=CONTENT_SHA))


@pytest.fixture
def hashes(monkeypatch):
    """Paths hashed by checkpoints._sha256_file, in order."""
    seen: list[Path] = []
    real = ckpt._sha256_file

    def counting(path):
        seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(ckpt, "_sha256_file", counting)
    return seen


def _put(folder: Path, content: bytes = CONTENT, filename: str = FILENAME) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_bytes(content)
    return path


def _record(path: Path) -> dict:
    return json.loads((path.parent / f".{path.name}.sha256.json").read_text())


# ---------------------------------------------------------------------------------------------
# 6. cached official files are hash-checked, once
# ---------------------------------------------------------------------------------------------


def test_matching_cached_file_is_used_and_hashed_once(cache, official, hashes):
    path = _put(cache)
    assert ckpt.resolve_checkpoint(NAME, download=False) == path
    assert hashes == [path]
    st = path.stat()
    assert _record(path) == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": CONTENT_SHA}
    # later starts: one stat, no hashing
    assert ckpt.resolve_checkpoint(NAME, download=False) == path
    assert ckpt.find_checkpoint(NAME, verify=True) == path
    assert ckpt.checkpoint_status(NAME) == (path, "verified")
    ckpt.verify_cached(NAME, path)
    assert hashes == [path]
    assert path.read_bytes() == CONTENT
    # the record is never taken for a checkpoint
    path.unlink()
    assert ckpt.find_checkpoint(NAME) is None


def test_changed_file_is_hashed_again(cache, official, hashes):
    path = _put(cache)
    ckpt.verify_cached(NAME, path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    ckpt.verify_cached(NAME, path)
    assert len(hashes) == 2
    assert _record(path)["mtime_ns"] == st.st_mtime_ns + 10**9
    # replaced by another file of the same size: the new mtime gives it away
    other = bytes(reversed(CONTENT))
    path.write_bytes(other)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    with pytest.raises(HashMismatchError, match="not the official"):
        ckpt.verify_cached(NAME, path)
    assert len(hashes) == 3 and path.read_bytes() == other


def test_broken_record_means_hashing_again(cache, official, hashes):
    path = _put(cache)
    record = cache / f".{FILENAME}.sha256.json"
    record.write_text("{not json")
    ckpt.verify_cached(NAME, path)
    assert len(hashes) == 1 and _record(path)["sha256"] == CONTENT_SHA
    assert path.read_bytes() == CONTENT


@pytest.mark.parametrize("where", ["cache", "model"])
def test_unofficial_cached_file_is_refused_and_kept(cache, tmp_path, official, hashes, where):
    folder = cache if where == "cache" else tmp_path / "model"
    bad = b"my own fine-tuned weights, not the official file"
    path = _put(folder, bad)
    with pytest.raises(HashMismatchError) as info:
        ckpt.resolve_checkpoint(NAME)  # download=True: still no download over the user's file
    message = str(info.value)
    assert isinstance(info.value, CheckpointError)
    assert f"The file at {path} is not the official {NAME} checkpoint" in message
    assert CONTENT_SHA in message and hashlib.sha256(bad).hexdigest() in message
    assert f"napari-sam2 download {NAME} --force" in message
    assert REGISTRY[NAME].url in message and "--checkpoint" in message
    # build_model goes through the same check
    with pytest.raises(HashMismatchError, match="not the official"):
        build_model(NAME, download=False)
    # the listing reports it without raising; the plain lookup still finds it
    found, status = ckpt.checkpoint_status(NAME)
    assert found == path and status.startswith("NOT the official file")
    assert f"napari-sam2 download {NAME} --force" in status
    assert ckpt.find_checkpoint(NAME) == path and ckpt.is_cached(NAME)
    assert len(hashes) == 1  # the mismatch is remembered too
    # passed explicitly, the same file is the user's own weights: not hash-checked
    assert ckpt.resolve_checkpoint(NAME, checkpoint=path) == path
    assert len(hashes) == 1
    assert path.read_bytes() == bad
    assert sorted(p.name for p in folder.iterdir()) == sorted([FILENAME, f".{FILENAME}.sha256.json"])


def test_files_without_published_hash_are_not_hashed(cache, hashes):
    name = "sam2_hiera_tiny"
    assert REGISTRY[name].sha256 is None
    path = _put(cache, filename=f"{name}.pt")
    assert ckpt.resolve_checkpoint(name, download=False) == path
    assert ckpt.checkpoint_status(name) == (path, "unverified (no published sha256)")
    assert ckpt.checkpoint_status(NAME) == (None, "not found")
    assert hashes == [] and sorted(p.name for p in cache.iterdir()) == [f"{name}.pt"]
    assert path.read_bytes() == CONTENT


def test_unwritable_folder_is_checked_but_not_remembered(cache, official, hashes, monkeypatch):
    path = _put(cache)
    cache.chmod(0o555)
    try:
        if os.access(cache, os.W_OK):  # root ignores the mode: make writing fail anyway
            def refuse(*args, **kwargs):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(ckpt.tempfile, "mkstemp", refuse)
        ckpt.verify_cached(NAME, path)
        ckpt.verify_cached(NAME, path)
    finally:
        cache.chmod(0o755)
    assert len(hashes) == 2
    assert sorted(p.name for p in cache.iterdir()) == [FILENAME]
    assert path.read_bytes() == CONTENT


def test_download_remembers_the_verified_hash(cache, tmp_path, official, hashes):
    source = _put(tmp_path / "mirror")
    path = ckpt.download_checkpoint(NAME, progress=False, url=source.as_uri())
    assert path == cache / FILENAME and path.read_bytes() == CONTENT
    assert _record(path)["sha256"] == CONTENT_SHA
    assert ckpt.resolve_checkpoint(NAME, download=False) == path
    assert hashes == []  # hashed while downloading, never again
    assert source.read_bytes() == CONTENT


# ---------------------------------------------------------------------------------------------
# 7. checkpoints that carry code
# ---------------------------------------------------------------------------------------------


class SomeClass:
    """Any Python object, even a harmless one, needs code to rebuild it."""


class SystemCall:
    def __init__(self, marker: Path):
        self.command = f"touch {marker}"

    def __reduce__(self):
        return (os.system, (self.command,))


class EvalCall:
    def __init__(self, marker: Path):
        self.source = f"open({str(marker)!r}, 'w')"

    def __reduce__(self):
        return (builtins.eval, (self.source,))


@pytest.mark.parametrize(
    "make, global_name",
    [
        (lambda marker: {"model": {"w": torch.zeros(1)}, "x": SomeClass()}, "SomeClass"),
        (lambda marker: {"model": SystemCall(marker)}, "system"),
        (lambda marker: {"model": {"w": torch.zeros(1)}, "x": EvalCall(marker)}, "eval"),
    ],
    ids=["object", "os.system", "eval"],
)
def test_code_in_checkpoint_is_refused_and_not_run(tmp_path, make, global_name):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(make(marker), path)
    data = path.read_bytes()
    for load in (ckpt.load_state_dict, lambda p: build_model(NAME, checkpoint=p)):
        with pytest.raises(CheckpointError) as info:
            load(path)
        message = str(info.value)
        assert f"Checkpoint file {path} contains executable code" in message
        assert global_name in message and "must hold only tensors" in message
        assert "torch.save(model.state_dict(), path)" in message
        assert "weights_only" not in message
    assert not marker.exists()
    assert path.read_bytes() == data


# ---------------------------------------------------------------------------------------------
# 8. NaN / inf / integer weights
# ---------------------------------------------------------------------------------------------


def test_official_layout_is_all_floating_point():
    """What the non-float check assumes about our own model."""
    sd = build_model(NAME, pretrained=False).state_dict()
    assert sd and all(t.is_floating_point() for t in sd.values())


def test_nan_inf_and_integer_weights_are_refused(tmp_path, random_checkpoint):
    sd = torch.load(random_checkpoint, weights_only=True)["model"]
    float_keys = [k for k, t in sd.items() if t.is_floating_point()]
    nan_a, nan_b, inf_c, int_d = float_keys[0], float_keys[5], float_keys[-1], float_keys[7]
    sd[nan_a] = sd[nan_a].clone().fill_(float("nan"))
    sd[nan_b] = sd[nan_b].clone()
    sd[nan_b].view(-1)[0] = float("nan")  # one bad value is enough
    sd[inf_c] = sd[inf_c].clone().fill_(float("-inf"))
    sd[int_d] = sd[int_d].to(torch.int64)
    path = tmp_path / "diverged.pt"
    torch.save({"model": sd}, path)
    data = path.read_bytes()
    with pytest.raises(CheckpointError) as info:
        build_model(NAME, checkpoint=path)
    message = str(info.value)
    assert str(path) in message
    assert "3 tensors hold NaN or infinite values" in message
    assert all(k in message for k in (nan_a, nan_b, inf_c))
    assert f"1 tensor is not floating point (torch.int64): {int_d}" in message
    assert "damaged" in message and "diverged training run" in message
    assert f"napari-sam2 download {NAME} --force" in message
    assert path.read_bytes() == data


def test_load_weights_leaves_model_untouched_and_allows_integer_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert before["1.num_batches_tracked"].dtype == torch.int64  # legitimately integer
    ckpt.load_weights(model, {k: v.clone() for k, v in before.items()}, NAME)
    bad = {k: v.clone() for k, v in before.items()}
    bad["0.weight"][0, 0] = float("inf")
    bad["1.weight"][:] = 3e38  # finite, though its sum overflows: must not be refused
    bad["0.bias"] = bad["0.bias"].to(torch.bool)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_weights(model, bad, NAME, source="run/last.pt")
    message = str(info.value)
    assert "run/last.pt" in message
    assert "1 tensor holds NaN or infinite values: 0.weight" in message
    assert "1 tensor is not floating point (torch.bool): 0.bias" in message
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a refused load"


# ---------------------------------------------------------------------------------------------
# paths that are not checkpoint files
# ---------------------------------------------------------------------------------------------


def test_folder_given_as_checkpoint(cache, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    with pytest.raises(CheckpointError) as info:
        ckpt.resolve_checkpoint(NAME, checkpoint=folder)
    assert f"{folder} (given for model {NAME}) is a folder" in str(info.value)
    assert "no .pt files" in str(info.value)
    for i in range(4):
        (folder / f"run{i}.pt").write_bytes(b"x")
    for call in (lambda: ckpt.resolve_checkpoint(NAME, checkpoint=folder),
                 lambda: ckpt.load_state_dict(folder)):
        with pytest.raises(CheckpointError) as info:
            call()
        message = str(info.value)
        assert "is a folder" in message and "pass the .pt file inside it" in message
        assert "run0.pt, run1.pt, run2.pt and 1 more" in message
        assert "does not exist" not in message
    assert sorted(p.name for p in folder.iterdir()) == [f"run{i}.pt" for i in range(4)]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_opening_it(cache, tmp_path):
    fifo = tmp_path / "stream.pt"
    os.mkfifo(fifo)
    opened = threading.Event()

    def unblock():
        # If the code under test opened the FIFO it is blocked waiting for a writer: be one,
        # so the test fails instead of hanging.
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            opened.set()
        except OSError:  # ENXIO: nobody is reading, as it should be
            pass

    timer = threading.Timer(10, unblock)
    timer.start()
    try:
        for call in (lambda: ckpt.resolve_checkpoint(NAME, checkpoint=fifo),
                     lambda: ckpt.load_state_dict(fifo),
                     lambda: build_model(NAME, checkpoint=fifo)):
            with pytest.raises(CheckpointError, match="is not a regular file") as info:
                call()
            assert str(fifo) in str(info.value)
    finally:
        timer.cancel()
    assert not opened.is_set()
    assert fifo.exists()
