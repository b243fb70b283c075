"""Tests for napari_sam2.checkpoints: registry, cache, downloads over real HTTP, safe loading."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import socket
import threading
from pathlib import Path

import pytest
import torch

from napari_sam2 import checkpoints as ckpt
from napari_sam2.checkpoints import (
    REGISTRY,
    CheckpointError,
    DownloadError,
    HashMismatchError,
)
from napari_sam2.modeling.configs import CONFIGS

NAME = "sam2.1_hiera_tiny"
FILENAME = f"{NAME}.pt"


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# A small but real torch file, in the official {"model": state_dict} layout.
STATE = {"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.ones(2)}
PAYLOAD = _torch_bytes({"model": STATE})
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """/good/<file>: the payload; /truncated/<file>: promises more bytes than it sends."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path.startswith("/good/"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path.startswith("/truncated/"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD) + 5000))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            self.close_connection = True
        else:
            self.send_error(404, "Not Found")

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder, a cwd without ./model, no mirror set."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("NAPARI_SAM2_CACHE", str(folder))
    monkeypatch.delenv("NAPARI_SAM2_BASE_URL", raising=False)
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return folder


@pytest.fixture
def registry_sha(monkeypatch):
    """Set the registry's sha256 for NAME (the real one belongs to the real file)."""

    def set_sha(sha256):
        monkeypatch.setitem(REGISTRY, NAME, dataclasses.replace(REGISTRY[NAME], sha256=sha256))

    return set_sha


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------


def test_registry_covers_every_config_with_official_urls():
    assert set(REGISTRY) == set(CONFIGS) and len(REGISTRY) == 8
    for name, entry in REGISTRY.items():
        assert entry.name == name
        assert entry.filename == f"{name}.pt"
        base = "https://dl.fbaipublicfiles.com/segment_anything_2"
        if name.startswith("sam2.1_"):
            assert entry.url == f"{base}/092824/{name}.pt"
            assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        else:
            assert entry.url == f"{base}/072824/{name}.pt"
            assert entry.sha256 is None
    assert REGISTRY["sam2.1_hiera_tiny"].sha256.startswith("7402e0d8")
    assert REGISTRY["sam2.1_hiera_large"].sha256.endswith("e47dd318")
    with pytest.raises(dataclasses.FrozenInstanceError):
        REGISTRY[NAME].url = "http://example.com"


@pytest.mark.parametrize(
    "call",
    [
        ckpt.find_checkpoint,
        ckpt.is_cached,
        ckpt.checkpoint_url,
        ckpt.download_checkpoint,
        ckpt.resolve_checkpoint,
    ],
)
def test_unknown_name_lists_known_names(call, cache):
    with pytest.raises(ValueError, match="sam2_hiera_huge") as info:
        call("sam2_hiera_huge")
    assert "sam2.1_hiera_tiny" in str(info.value) and "sam2_hiera_large" in str(info.value)


def test_base_url_env_replaces_prefix(monkeypatch):
    monkeypatch.setenv("NAPARI_SAM2_BASE_URL", "http://mirror.local/sam2/")
    assert ckpt.checkpoint_url("sam2_hiera_small") == "http://mirror.local/sam2/sam2_hiera_small.pt"
    monkeypatch.delenv("NAPARI_SAM2_BASE_URL")
    assert ckpt.checkpoint_url("sam2_hiera_small") == REGISTRY["sam2_hiera_small"].url


# ---------------------------------------------------------------------------------------------
# cache lookup
# ---------------------------------------------------------------------------------------------


def test_cache_dir_env_override_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_SAM2_CACHE", str(tmp_path / "x"))
    assert ckpt.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("NAPARI_SAM2_CACHE")
    assert ckpt.cache_dir().name == "napari-sam2"
    assert ckpt.search_paths()[1] == Path.cwd() / "model"


def test_find_checkpoint_in_cache_then_model_folder(cache):
    assert ckpt.find_checkpoint(NAME) is None and not ckpt.is_cached(NAME)
    local = Path.cwd() / "model" / FILENAME
    local.parent.mkdir()
    local.write_bytes(PAYLOAD)
    assert ckpt.find_checkpoint(NAME) == local and ckpt.is_cached(NAME)
    cache.mkdir()
    (cache / FILENAME).write_bytes(PAYLOAD)
    assert ckpt.find_checkpoint(NAME) == cache / FILENAME  # the cache comes first
    # a partial download's temporary name is never taken for a checkpoint
    (cache / FILENAME).unlink()
    (cache / f".{FILENAME}.abc.part").write_bytes(PAYLOAD[:10])
    assert ckpt.find_checkpoint(NAME) == local


# ---------------------------------------------------------------------------------------------
# downloads over real HTTP
# ---------------------------------------------------------------------------------------------


def test_download_good_file_verifies_and_loads(server, cache, registry_sha):
    registry_sha(PAYLOAD_SHA)
    path = ckpt.download_checkpoint(NAME, progress=False, url=f"{server}/good/{FILENAME}")
    assert path == cache / FILENAME
    assert path.read_bytes() == PAYLOAD
    # no temporary file left behind; the hidden record of the verified hash is kept
    assert _files(cache) == sorted([FILENAME, f".{FILENAME}.sha256.json"])
    sd = ckpt.load_state_dict(path)
    assert torch.equal(sd["weight"], STATE["weight"]) and torch.equal(sd["bias"], STATE["bias"])
    assert ckpt.is_cached(NAME)


def test_download_via_mirror_env_with_progress_bar(
    server, cache, registry_sha, monkeypatch, capsys
):
    registry_sha(PAYLOAD_SHA)
    monkeypatch.setenv("NAPARI_SAM2_BASE_URL", f"{server}/good")
    path = ckpt.download_checkpoint(NAME, progress=True)
    assert path.read_bytes() == PAYLOAD
    assert FILENAME in capsys.readouterr().err  # tqdm drew a bar


def test_download_without_known_hash(server, cache):
    name = "sam2_hiera_tiny"  # no published sha256
    path = ckpt.download_checkpoint(name, progress=False, url=f"{server}/good/x.pt")
    assert path == cache / f"{name}.pt" and path.read_bytes() == PAYLOAD


def test_wrong_hash_is_refused_and_removed(server, cache, registry_sha):
    wrong = "0" * 64
    registry_sha(wrong)
    with pytest.raises(HashMismatchError) as info:
        ckpt.download_checkpoint(NAME, progress=False, url=f"{server}/good/{FILENAME}")
    message = str(info.value)
    assert wrong in message and PAYLOAD_SHA in message and "removed" in message
    assert _files(cache) == []


def test_wrong_hash_keeps_no_stale_file_over_existing(server, cache, registry_sha):
    """A failed re-download leaves the previous good file alone rather than a half one."""
    cache.mkdir()
    (cache / FILENAME).write_bytes(b"previous")
    registry_sha("0" * 64)
    with pytest.raises(HashMismatchError):
        ckpt.download_checkpoint(NAME, progress=False, url=f"{server}/good/{FILENAME}")
    assert _files(cache) == [FILENAME] and (cache / FILENAME).read_bytes() == b"previous"


def test_truncated_transfer_is_an_error(server, cache, registry_sha):
    registry_sha(None)  # so only the length check can catch it
    url = f"{server}/truncated/{FILENAME}"
    with pytest.raises(DownloadError, match="cut off") as info:
        ckpt.download_checkpoint(NAME, progress=False, url=url)
    assert url in str(info.value)
    assert _files(cache) == []


def test_404_names_url_and_manual_path(server, cache):
    url = f"{server}/missing/{FILENAME}"
    with pytest.raises(DownloadError) as info:
        ckpt.download_checkpoint(NAME, progress=False, url=url)
    message = str(info.value)
    assert "404" in message and url in message
    assert str(cache / FILENAME) in message
    assert str(Path.cwd() / "model" / FILENAME) in message
    assert _files(cache) == []


def test_unreachable_host_names_url_and_manual_path(cache):
    url = f"http://127.0.0.1:{_unused_port()}/{FILENAME}"
    with pytest.raises(CheckpointError) as info:
        ckpt.download_checkpoint(NAME, progress=False, url=url)
    assert isinstance(info.value, DownloadError) and isinstance(info.value, RuntimeError)
    assert url in str(info.value) and str(cache / FILENAME) in str(info.value)
    assert _files(cache) == []


# ---------------------------------------------------------------------------------------------
# resolve_checkpoint
# ---------------------------------------------------------------------------------------------


def test_resolve_explicit_path(cache, tmp_path):
    explicit = tmp_path / "mine.pt"
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.resolve_checkpoint(NAME, explicit)
    explicit.write_bytes(PAYLOAD)
    assert ckpt.resolve_checkpoint(NAME, explicit) == explicit
    assert ckpt.resolve_checkpoint(NAME, str(explicit)) == explicit


def test_resolve_uses_local_file_without_network(cache, monkeypatch, registry_sha):
    registry_sha(PAYLOAD_SHA)  # a cached file is hash-checked: the real sha256 is the real file's
    # A mirror that cannot be reached proves no download is attempted.
    monkeypatch.setenv("NAPARI_SAM2_BASE_URL", f"http://127.0.0.1:{_unused_port()}")
    local = Path.cwd() / "model" / FILENAME
    local.parent.mkdir()
    local.write_bytes(PAYLOAD)
    assert ckpt.resolve_checkpoint(NAME) == local


def test_resolve_without_download(cache):
    with pytest.raises(CheckpointError) as info:
        ckpt.resolve_checkpoint(NAME, download=False)
    message = str(info.value)
    assert REGISTRY[NAME].url in message and str(cache / FILENAME) in message


def test_resolve_downloads_when_missing(server, cache, registry_sha, monkeypatch):
    registry_sha(PAYLOAD_SHA)
    monkeypatch.setenv("NAPARI_SAM2_BASE_URL", f"{server}/good")
    assert ckpt.resolve_checkpoint(NAME) == cache / FILENAME
    assert (cache / FILENAME).read_bytes() == PAYLOAD


# ---------------------------------------------------------------------------------------------
# safe loading
# ---------------------------------------------------------------------------------------------


class Arbitrary:
    """Any Python object: weights_only loading must refuse to rebuild it."""

    def __init__(self):
        self.value = 42


class RunsCode:
    """Unpickling this would create a file, i.e. run code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_state_dict_accepts_both_layouts(tmp_path):
    wrapped, bare = tmp_path / "wrapped.pt", tmp_path / "bare.pt"
    wrapped.write_bytes(PAYLOAD)
    torch.save(STATE, bare)
    for path in (wrapped, bare):
        sd = ckpt.load_state_dict(path)
        assert set(sd) == {"weight", "bias"}
        assert torch.equal(sd["weight"], STATE["weight"])


def test_load_state_dict_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "object.pt"
    torch.save({"model": {"weight": torch.zeros(1)}, "extra": Arbitrary()}, path)
    with pytest.raises(CheckpointError, match="object.pt") as info:
        ckpt.load_state_dict(path)
    assert "executable code" in str(info.value) and "Arbitrary" in str(info.value)
    assert "weights_only" not in str(info.value)


def test_load_state_dict_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError):
        ckpt.load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not a checkpoint", PAYLOAD[: len(PAYLOAD) // 2], PAYLOAD[:-100]],
    ids=["empty", "text", "half", "short-tail"],
)
def test_load_state_dict_corrupt_files(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "corrupt" in message and "download it again" in message
    assert "weights_only" not in message  # never pass on torch's advice to load unsafely


@pytest.mark.parametrize("obj", [[torch.zeros(1)], {}, {"model": {"a": 3}}, torch.zeros(2)])
def test_load_state_dict_rejects_non_state_dicts(tmp_path, obj):
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="not a SAM2 checkpoint"):
        ckpt.load_state_dict(path)


def test_load_state_dict_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load_state_dict(tmp_path / "nope.pt")


# ---------------------------------------------------------------------------------------------
# identify_state_dict
# ---------------------------------------------------------------------------------------------

_FINGERPRINT = {"tiny": (12, 96), "small": (16, 96), "base_plus": (24, 112), "large": (48, 144)}


def _fake_sd(blocks: int, channels: int, v21: bool) -> dict[str, torch.Tensor]:
    """Tiny tensors with the key pattern and pos_embed shape of a real checkpoint."""
    sd = {"image_encoder.trunk.pos_embed": torch.zeros(1, channels, 7, 7)}
    for i in range(blocks):
        sd[f"image_encoder.trunk.blocks.{i}.norm1.weight"] = torch.zeros(1)
        sd[f"image_encoder.trunk.blocks.{i}.mlp.layers.0.weight"] = torch.zeros(1)
    sd["sam_mask_decoder.iou_token.weight"] = torch.zeros(1)
    if v21:
        sd["obj_ptr_tpos_proj.weight"] = torch.zeros(64, 256)
    return sd


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_identify_each_config(name):
    config = CONFIGS[name]
    blocks, channels = _FINGERPRINT[config.size]
    assert ckpt.identify_state_dict(_fake_sd(blocks, channels, config.version == "sam2.1")) == name


def test_identify_rejects_non_sam2():
    assert ckpt.identify_state_dict({"weight": torch.zeros(2)}) is None
    assert ckpt.identify_state_dict({}) is None
    assert ckpt.identify_state_dict(_fake_sd(12, 144, True)) is None  # tiny depth, large width
    assert ckpt.identify_state_dict(_fake_sd(13, 96, False)) is None
    no_pos = _fake_sd(12, 96, False)
    del no_pos["image_encoder.trunk.pos_embed"]
    assert ckpt.identify_state_dict(no_pos) is None


# ---------------------------------------------------------------------------------------------
# load_weights
# ---------------------------------------------------------------------------------------------


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2)
        self.norm = torch.nn.LayerNorm(2)


def test_load_weights_success():
    model, source = Small(), Small()
    with torch.no_grad():
        for p in source.parameters():
            p.uniform_()
    ckpt.load_weights(model, source.state_dict(), NAME)
    assert torch.equal(model.proj.weight, source.proj.weight)


def test_load_weights_mismatch_message_and_model_untouched():
    model = Small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = dict(Small().state_dict())
    del sd["norm.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["proj.weight"] = torch.zeros(2, 5)
    sd["proj.bias"] = torch.full((2,), 7.0)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_weights(model, sd, NAME, source="some/file.pt")
    message = str(info.value)
    assert "expected sam2.1_hiera_tiny" in message
    assert "does not look like a SAM2 checkpoint" in message
    assert "some/file.pt" in message
    assert "1 missing keys: norm.bias" in message
    assert "1 unexpected keys: extra.weight" in message
    assert "proj.weight: file [2, 5] vs model [2, 3]" in message
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a failed load"


def test_load_weights_names_the_lookalike_and_caps_lists():
    sd = _fake_sd(48, 144, False)  # shaped like sam2_hiera_large
    with pytest.raises(CheckpointError) as info:
        ckpt.load_weights(Small(), sd, NAME)
    message = str(info.value)
    assert "this file looks like sam2_hiera_large" in message
    assert "expected sam2.1_hiera_tiny" in message
    assert f"{len(sd)} unexpected keys" in message
    assert f"(and {len(sd) - 10} more)" in message
    assert message.count("image_encoder.trunk.") == 10  # only the first ten are listed


def test_model_readme_matches_registry():
    """The model card must not drift from the registry."""
    readme = (Path(__file__).resolve().parents[1] / "model" / "README.md").read_text()
    for entry in REGISTRY.values():
        assert entry.url in readme
        if entry.sha256:
            assert entry.sha256 in readme


def test_download_reports_progress_to_a_callback_and_can_be_stopped(server, cache, registry_sha, monkeypatch, capsys):
    registry_sha(PAYLOAD_SHA)
    monkeypatch.setenv("NAPARI_SAM2_BASE_URL", f"{server}/good")
    calls = []
    path = ckpt.resolve_checkpoint(NAME, report=lambda n, total: calls.append((n, total)))
    assert path.read_bytes() == PAYLOAD
    assert sum(n for n, _ in calls) == len(PAYLOAD) and {t for _, t in calls} == {len(PAYLOAD)}
    assert FILENAME not in capsys.readouterr().err  # the caller draws the bar, not tqdm
    path.unlink()

    class Stop(Exception):
        pass

    def stop(n, total):
        raise Stop

    with pytest.raises(Stop):
        ckpt.resolve_checkpoint(NAME, report=stop)
    assert not [f for f in _files(cache) if f.endswith(".part") or f == FILENAME]  # no partial file kept
