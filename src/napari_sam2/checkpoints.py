"""Finding, downloading and safely loading the official SAM2 checkpoints.

The eight checkpoints published by Meta are listed in :data:`REGISTRY`, one per config name
in :mod:`napari_sam2.modeling.configs`. Files live in a per-user cache folder
(:func:`cache_dir`) or in ``./model`` next to where the program runs, so that users without
internet access can drop a file there by hand.

Downloads go to a temporary file in the cache folder and are renamed into place only once
they are complete and verified, so a file with a checkpoint's final name is always whole.
Files are always read with ``torch.load(..., weights_only=True)``: a checkpoint is data and
must never be able to run code.

An official file found in the cache or in ``./model`` is checked against its published SHA-256
(sam2.1 files have one) the first time it is used; the result is remembered in a hidden record
next to it (``.<filename>.sha256.json``), keyed by the file's size and modification time, so
later starts do not read the whole file again. Files passed explicitly are never hash-checked:
they may be the user's own fine-tuned weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import pickle
import re
import stat
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from napari_sam2.modeling.configs import CONFIGS, get_config

__all__ = [
    "REGISTRY",
    "CheckpointEntry",
    "CheckpointError",
    "DownloadError",
    "HashMismatchError",
    "cache_dir",
    "checkpoint_status",
    "checkpoint_url",
    "download_checkpoint",
    "find_checkpoint",
    "identify_state_dict",
    "is_cached",
    "load_state_dict",
    "load_weights",
    "resolve_checkpoint",
    "search_paths",
    "verify_cached",
]

#: Environment variable that replaces the default cache folder.
CACHE_ENV = "NAPARI_SAM2_CACHE"
#: Environment variable naming a mirror folder: ``<base>/<filename>`` replaces the official URL.
BASE_URL_ENV = "NAPARI_SAM2_BASE_URL"

_SAM2_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2"
_TIMEOUT_S = 60  # per socket operation, not for the whole transfer
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, downloaded, read or matched to a model."""


class DownloadError(CheckpointError):
    """A download failed (offline, unreachable host, HTTP error, truncated transfer)."""


class HashMismatchError(CheckpointError):
    """A downloaded or cached official file does not have the published SHA-256."""


@dataclass(frozen=True)
class CheckpointEntry:
    """Where to get one official checkpoint.

    Attributes
    ----------
    name : str
        Config name, e.g. ``"sam2.1_hiera_tiny"``.
    url : str
        Official download URL.
    sha256 : str or None
        Published SHA-256 of the file. Meta published none for the original SAM2 files; those
        are checked only by the strict key and shape checks of :func:`load_weights`.
    filename : str
        File name in the cache folder and in ``./model``.
    """

    name: str
    url: str
    sha256: str | None
    filename: str


_SAM2_1_SHA256 = {
    "tiny": "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69",
    "small": "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",
    "base_plus": "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5",
    "large": "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318",
}
# Each release lives in a folder named after its date (MMDDYY).
_RELEASE_DIR = {"sam2": "072824", "sam2.1": "092824"}


def _entry(name: str) -> CheckpointEntry:
    config = CONFIGS[name]
    filename = f"{name}.pt"
    sha256 = _SAM2_1_SHA256[config.size] if config.version == "sam2.1" else None
    url = f"{_SAM2_BASE}/{_RELEASE_DIR[config.version]}/{filename}"
    return CheckpointEntry(name=name, url=url, sha256=sha256, filename=filename)


REGISTRY: dict[str, CheckpointEntry] = {name: _entry(name) for name in CONFIGS}


def _get_entry(name: str) -> CheckpointEntry:
    # get_config raises the project's standard "Unknown SAM2 model name" ValueError.
    get_config(name)
    return REGISTRY[name]


# --------------------------------------------------------------------------------------
# where files live
# --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The folder downloads go to.

    Returns
    -------
    pathlib.Path
        ``$NAPARI_SAM2_CACHE`` if set, else the platform's user cache folder for
        ``napari-sam2`` (``~/.cache/napari-sam2`` on Linux). It may not exist yet.
    """
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    # Imported here: pooch pulls in requests, which the rest of this module does not need.
    import pooch

    return Path(pooch.os_cache("napari-sam2"))


def search_paths() -> list[Path]:
    """Folders searched for checkpoints, in order: the cache folder, then ``./model``."""
    return [cache_dir(), Path.cwd() / "model"]


def checkpoint_url(name: str) -> str:
    """The URL ``name`` is downloaded from.

    ``$NAPARI_SAM2_BASE_URL``, if set, replaces everything before the file name, so a mirror
    is one flat folder holding all the ``.pt`` files.
    """
    entry = _get_entry(name)
    base = os.environ.get(BASE_URL_ENV)
    if base:
        return f"{base.rstrip('/')}/{entry.filename}"
    return entry.url


def find_checkpoint(name: str, *, verify: bool = False) -> Path | None:
    """An existing checkpoint file for ``name`` in :func:`search_paths`, or None.

    Parameters
    ----------
    name : str
        Config name, e.g. ``"sam2.1_hiera_tiny"``.
    verify : bool
        Check the file found with :func:`verify_cached` (the first time only; the result is
        remembered). False: just look, which never reads the file.

    Raises
    ------
    HashMismatchError
        With ``verify=True``: the file found is not the official one.
    """
    entry = _get_entry(name)
    for folder in search_paths():
        candidate = folder / entry.filename
        if candidate.is_file():
            if verify:
                verify_cached(name, candidate)
            return candidate
    return None


def is_cached(name: str) -> bool:
    """Whether a file for ``name`` is in :func:`search_paths` (not hash-checked: cheap)."""
    return find_checkpoint(name) is not None


def verify_cached(name: str, path: str | os.PathLike) -> None:
    """Check that ``path`` is the official checkpoint ``name``, if it has a published SHA-256.

    The file is hashed once; the hash is remembered in a hidden record next to it
    (``.<filename>.sha256.json``) together with the file's size and ``mtime_ns``, so that later
    calls cost a ``stat`` and a tiny read. A changed file is hashed again. A folder that cannot be written to
    just means hashing every time. The file itself is never changed or removed.

    Parameters
    ----------
    name : str
        Config name, e.g. ``"sam2.1_hiera_tiny"``.
    path : path-like
        The file found for it in the cache or in ``./model``.

    Raises
    ------
    HashMismatchError
        The file's SHA-256 differs from the published one. The message says how to fix it.
    CheckpointError
        The file cannot be read.
    """
    entry = _get_entry(name)
    if entry.sha256 is None:  # nothing published to compare with (the original sam2 files)
        return
    path = Path(path)
    digest = _remembered_sha256(path)
    if digest != entry.sha256:
        raise HashMismatchError(
            f"The file at {path} is not the official {name} checkpoint (expected sha256 "
            f"{entry.sha256}, got {digest}). The file was left as it is. To fix it, delete it and "
            f"run `napari-sam2 download {name} --force` (or download {entry.url} yourself and "
            f"save it as {path}). If it is your own fine-tuned weights, rename it and pass it "
            f"explicitly with --checkpoint PATH (checkpoint=PATH in Python)."
        )


def checkpoint_status(name: str) -> tuple[Path | None, str]:
    """Where the checkpoint for ``name`` is and whether it is the official file; never raises.

    For listings such as ``napari-sam2 models``. Hashes the file if it was not checked before.

    Returns
    -------
    path : pathlib.Path or None
        The file :func:`resolve_checkpoint` would use, or None if there is none.
    status : str
        ``"not found"``, ``"verified"``, ``"unverified (no published sha256)"``, or a text
        starting with ``"NOT the official file"`` or ``"unreadable"`` that says what to do.
    """
    entry = _get_entry(name)
    path = find_checkpoint(name)
    if path is None:
        return None, "not found"
    if entry.sha256 is None:
        return path, "unverified (no published sha256)"
    try:
        digest = _remembered_sha256(path)
    except CheckpointError as exc:
        return path, f"unreadable: {exc}"
    if digest != entry.sha256:
        return path, (
            f"NOT the official file (expected sha256 {entry.sha256[:12]}..., got "
            f"{digest[:12]}...): delete it and run `napari-sam2 download {name} --force`, or "
            f"rename it and pass it with --checkpoint"
        )
    return path, "verified"


def _record_path(path: Path) -> Path:
    # Hidden, and never equal to a checkpoint's name, so find_checkpoint cannot pick it up.
    return path.with_name(f".{path.name}.sha256.json")


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _remembered_sha256(path: Path) -> str:
    """SHA-256 of ``path``, from its record if size and mtime_ns still match, else hashed."""
    try:
        before = path.stat()
        try:
            record = json.loads(_record_path(path).read_text())
            if (record["size"], record["mtime_ns"]) == (before.st_size, before.st_mtime_ns):
                return str(record["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no record, or an unusable one: hash again
        digest = _sha256_file(path)
        after = path.stat()
    except OSError as exc:
        raise CheckpointError(f"Cannot read checkpoint file {path}: {exc}") from exc
    # A file that changed while it was read may not match the digest: do not remember it.
    if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
        _remember_sha256(path, digest, after)
    return digest


def _remember_sha256(path: Path, digest: str, st: os.stat_result) -> None:
    """Write the record for ``path``; best effort, since it only saves time."""
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    target = _record_path(path)
    try:
        # Written to a temporary file and renamed, so that a process reading concurrently
        # (e.g. Dask workers sharing the cache) never sees half a record.
        fd, tmp = tempfile.mkstemp(prefix=f"{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError:
        return  # read-only folder: just do not remember
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(record, out)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache must stay readable
        os.replace(tmp, target)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def _manual_hint(url: str, filename: str) -> str:
    target = cache_dir() / filename
    alternative = Path.cwd() / "model" / filename
    return f"Download {url} yourself and save it as {target} (or {alternative})."


# --------------------------------------------------------------------------------------
# downloading
# --------------------------------------------------------------------------------------


def download_checkpoint(name: str, *, progress: bool = True, url: str | None = None,
                        report: Callable[[int, int | None], None] | None = None) -> Path:
    """Download the checkpoint for ``name`` into :func:`cache_dir`.

    Always downloads (an existing file is replaced atomically); use
    :func:`resolve_checkpoint` to reuse a file that is already there.

    Parameters
    ----------
    name : str
        Config name, e.g. ``"sam2.1_hiera_tiny"``.
    progress : bool
        Show a tqdm progress bar on stderr.
    url : str, optional
        Download from here instead of :func:`checkpoint_url` (mirrors, tests). The
        registry's SHA-256 is still checked.
    report : callable, optional
        ``report(nbytes, total_bytes_or_None)`` after each chunk received (a GUI's progress bar);
        an exception it raises stops the download and removes the partial file.

    Returns
    -------
    pathlib.Path
        The complete, verified file.

    Raises
    ------
    DownloadError
        Offline, unreachable host, HTTP error or truncated transfer. The message names the URL
        and where to save the file by hand.
    HashMismatchError
        The file's SHA-256 differs from the published one; nothing is kept.
    """
    entry = _get_entry(name)
    url = url or checkpoint_url(name)
    folder = cache_dir()
    target = folder / entry.filename
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # The temporary file sits next to the target so that os.replace is an atomic rename
        # on the same file system; its name never equals the target's, so find_checkpoint
        # cannot mistake a partial download for a checkpoint.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".part", dir=folder)
    except OSError as exc:
        raise DownloadError(
            f"Cannot write to the checkpoint cache folder {folder}: {exc}. Set {CACHE_ENV} to a "
            f"writable folder, or put the file in {Path.cwd() / 'model'} by hand "
            f"(download it from {url})."
        ) from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _fetch(url, out, progress=progress, entry=entry, report=report)
        if entry.sha256 is not None and digest != entry.sha256:
            raise HashMismatchError(
                f"The file downloaded from {url} is not the published {entry.name} checkpoint: "
                f"expected sha256 {entry.sha256}, got {digest}. The downloaded file was removed. "
                f"Try again; if it keeps failing, the server or a proxy is sending another file. "
                + _manual_hint(entry.url, entry.filename)
            )
        # mkstemp makes the file private (0600); a checkpoint is not secret, and a shared
        # cache folder must stay readable by others.
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        # Also on KeyboardInterrupt: never leave temporary junk behind.
        tmp.unlink(missing_ok=True)
        raise
    if entry.sha256 is not None:
        # The file was hashed while it arrived: remember it, so the next start need not.
        with contextlib.suppress(OSError):
            _remember_sha256(target, digest, target.stat())
    return target


def _fetch(url: str, out, *, progress: bool, entry: CheckpointEntry,
           report: Callable[[int, int | None], None] | None = None) -> str:
    """Stream ``url`` into the open binary file ``out``; return the data's SHA-256."""
    from tqdm.auto import tqdm

    sha = hashlib.sha256()
    received = 0
    expected: int | None = None

    def fail(reason: str) -> DownloadError:
        return DownloadError(
            f"Could not download the {entry.name} checkpoint from {url}: {reason}. "
            + _manual_hint(url, entry.filename)
        )

    try:
        request = urllib.request.Request(url, headers={"User-Agent": "napari-sam2"})
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None and length.isdigit() else None
            with tqdm(
                total=expected,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=entry.filename,
                disable=not progress,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    sha.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                    if report is not None:
                        report(len(chunk), expected)
    except urllib.error.HTTPError as exc:
        raise fail(f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        # an OSError reason (refused, no route, DNS failure) usually means no network
        hint = " (are you offline?)" if isinstance(exc.reason, OSError) else ""
        raise fail(f"{exc.reason}{hint}") from exc
    except http.client.IncompleteRead as exc:
        # Raised for chunked transfers that end early.
        raise fail("the transfer was cut off before the end") from exc
    except (http.client.HTTPException, OSError, ValueError) as exc:
        raise fail(f"{type(exc).__name__}: {exc}") from exc

    # urllib does not complain when a server closes the connection before sending
    # Content-Length bytes, so count them ourselves.
    if expected is not None and received != expected:
        raise fail(f"the transfer was cut off: received {received} of {expected} bytes")
    return sha.hexdigest()


def resolve_checkpoint(
    name: str, checkpoint: str | os.PathLike | None = None, download: bool = True,
    report: Callable[[int, int | None], None] | None = None,
) -> Path:
    """The checkpoint file to use for ``name``.

    Parameters
    ----------
    name : str
        Config name, e.g. ``"sam2.1_hiera_tiny"``.
    checkpoint : path-like, optional
        Use this file; it must exist. It is not hash-checked: it may be fine-tuned weights.
    download : bool
        Download the file if it is not found locally. If False, a missing file is an error.
    report : callable, optional
        Download progress, as in :func:`download_checkpoint` (then no bar is printed).

    Returns
    -------
    pathlib.Path
        An explicit ``checkpoint``, else a file found by :func:`find_checkpoint` (checked with
        :func:`verify_cached`), else a fresh download.

    Raises
    ------
    CheckpointError
        ``checkpoint`` is missing, a folder or not a regular file; nothing was found and
        ``download`` is False; or the download failed.
    HashMismatchError
        The file found in the cache or ``./model`` is not the official one.
    """
    entry = _get_entry(name)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        _require_regular_file(path, f" (given for model {name})")
        return path
    found = find_checkpoint(name, verify=True)
    if found is not None:
        return found
    if not download:
        raise CheckpointError(
            f"No {name} checkpoint found in {', '.join(map(str, search_paths()))} and "
            f"downloading is disabled. " + _manual_hint(checkpoint_url(name), entry.filename)
        )
    return download_checkpoint(name, progress=report is None, report=report)


# --------------------------------------------------------------------------------------
# loading and checking
# --------------------------------------------------------------------------------------


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely.

    Parameters
    ----------
    path : path-like
        A ``.pt`` file holding either ``{"model": state_dict}`` (the official layout) or a
        bare state dict.

    Returns
    -------
    dict of str to torch.Tensor
        The state dict, on the CPU.

    Raises
    ------
    CheckpointError
        The path is missing, a folder or not a regular file (a FIFO is never opened); or the
        file is corrupt, truncated, not a torch file, or holds anything but tensors (Python
        objects need code to rebuild; ``weights_only=True`` refuses them and we say so).
    """
    path = Path(path)
    advice = "Delete it and download it again (or pass the right file)."
    _require_regular_file(path)
    try:
        # weights_only=True, always: a pickle can run arbitrary code when loaded.
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message suggests weights_only=False, which we must not echo. A refused
        # GLOBAL ("Unsupported global: GLOBAL __main__.Foo was not an allowed global", or for
        # os and the like "unsupported GLOBAL posix.system whose module posix is blocked")
        # means the pickle would build Python objects, i.e. run code; anything else means bytes
        # that are not a valid pickle at all.
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is not None:
            raise CheckpointError(
                f"Checkpoint file {path} contains executable code (Python objects: "
                f"{found.group(1)}) and will not be loaded: a checkpoint must hold only tensors. "
                f"Use the official file or re-save your weights with "
                f"torch.save(model.state_dict(), path)."
            ) from exc
        raise CheckpointError(
            f"Checkpoint file {path} is corrupt, truncated or not a SAM2 checkpoint "
            f"({_unpickler_reason(exc)}). {advice}"
        ) from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError... for bad files
        raise CheckpointError(
            f"Checkpoint file {path} is corrupt, truncated or not a SAM2 checkpoint "
            f"({type(exc).__name__}: {_first_line(exc)}). {advice}"
        ) from exc

    if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
        data = data["model"]
    if not (
        isinstance(data, Mapping)
        and data
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items())
    ):
        raise CheckpointError(
            f"Checkpoint file {path} is not a SAM2 checkpoint: expected a state dict of tensors "
            f"(or {{'model': state_dict}}), found {type(data).__name__}. {advice}"
        )
    return dict(data)


def _require_regular_file(path: Path, context: str = "") -> None:
    """Raise CheckpointError unless ``path`` is a regular file; only stats it, never opens it
    (opening a FIFO blocks until someone writes to it)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:  # also a broken link
        raise CheckpointError(f"Checkpoint file {path} does not exist{context}.") from None
    except OSError as exc:
        raise CheckpointError(f"Checkpoint file {path}{context} cannot be read: {exc}") from exc
    if stat.S_ISDIR(mode):
        try:
            inside = sorted(p.name for p in path.glob("*.pt") if p.is_file())
        except OSError:  # a folder we may not list: say so without a listing
            inside = []
        more = f" and {len(inside) - 3} more" if len(inside) > 3 else ""
        what = f"it holds {', '.join(inside[:3])}{more}" if inside else "it holds no .pt files"
        raise CheckpointError(
            f"Checkpoint {path}{context} is a folder, not a file: pass the .pt file inside it "
            f"instead ({what})."
        )
    if not stat.S_ISREG(mode):
        raise CheckpointError(
            f"Checkpoint {path}{context} is not a regular file (a pipe, socket or device); it "
            f"was not opened. Pass the .pt checkpoint file itself."
        )


def _unpickler_reason(exc: BaseException) -> str:
    match = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
    if match is None:
        return _first_line(exc)
    # drop torch's advice to allowlist the class: for a checkpoint that is never right
    return match.group(1).split(". Please use")[0].strip()


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc`` that is not torch's advice to load with weights_only=False."""
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [line for line in lines if line and "weights_only" not in line]
    return kept[0] if kept else type(exc).__name__


_BLOCK_KEY = re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.")
# Fingerprint of each size: (number of Hiera blocks, trunk embed dim = pos_embed channels).
_SIZE_SIGNATURE = {(sum(c.trunk.stages), c.trunk.embed_dim): c.size for c in CONFIGS.values()}


def identify_state_dict(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Guess which config a state dict belongs to.

    Parameters
    ----------
    sd : mapping of str to torch.Tensor
        A state dict as returned by :func:`load_state_dict`.

    Returns
    -------
    str or None
        A config name such as ``"sam2.1_hiera_large"``, or None if it does not look like a
        SAM2 checkpoint. The version comes from ``obj_ptr_tpos_proj.weight`` (sam2.1 only); the
        size from the trunk's block count together with the channels of
        ``image_encoder.trunk.pos_embed`` (tiny and small share 96 channels).
    """
    pos_embed = sd.get("image_encoder.trunk.pos_embed")
    if not isinstance(pos_embed, torch.Tensor) or pos_embed.ndim != 4:
        return None
    blocks = {int(m.group(1)) for key in sd if (m := _BLOCK_KEY.match(key))}
    size = _SIZE_SIGNATURE.get((len(blocks), int(pos_embed.shape[1])))
    if size is None:
        return None
    version = "sam2.1" if "obj_ptr_tpos_proj.weight" in sd else "sam2"
    return f"{version}_hiera_{size}"


def load_weights(
    model: torch.nn.Module,
    sd: Mapping[str, torch.Tensor],
    name: str,
    *,
    source: str | os.PathLike | None = None,
) -> None:
    """Load ``sd`` into ``model`` strictly, with an error that says what went wrong.

    Parameters
    ----------
    model : torch.nn.Module
        The freshly built model for config ``name``.
    sd : mapping of str to torch.Tensor
        Its weights, e.g. from :func:`load_state_dict`.
    name : str
        The config the model was built for; used in the error message.
    source : path-like, optional
        The file ``sd`` came from; used in the error message.

    Raises
    ------
    CheckpointError
        Keys missing or unexpected, shapes that differ, NaN or infinite values, or an integer
        or bool tensor where the model has a floating one. The model is left untouched. The
        message lists the offending keys and, for key or shape problems, which model the file
        looks like.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k}: file {list(sd[k].shape)} vs model {list(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    # Checked here rather than left to torch, whose error neither names the likely cause nor
    # guarantees the model is unchanged (it copies matching tensors before complaining).
    if missing or unexpected or mismatched:
        looks_like = identify_state_dict(sd)
        what = (
            f"this file looks like {looks_like}"
            if looks_like is not None
            else "this file does not look like a SAM2 checkpoint"
        )
        where = f" {source}" if source is not None else ""
        parts = [f"Checkpoint{where} does not fit model {name}: expected {name}, {what}."]
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                parts.append(f"{len(items)} {label}: {_shortlist(items)}.")
        if looks_like is not None and looks_like != name:
            parts.append(f"Use model name {looks_like!r} for this file, or the {name} checkpoint.")
        raise CheckpointError(" ".join(parts))
    _check_values(sd, own, name, source)
    try:
        model.load_state_dict(dict(sd), strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        raise CheckpointError(f"Could not load weights for {name}: {exc}") from exc


def _check_values(
    sd: Mapping[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
    name: str,
    source: str | os.PathLike | None,
) -> None:
    """Refuse NaN/inf weights and non-float tensors for float parameters.

    torch would load both without a word (it casts integers to float) and the model would then
    predict nothing, which looks like a segmentation problem rather than a bad file.
    """
    not_finite, not_float = [], []
    for key, mine in own.items():
        theirs = sd[key]
        if mine.is_floating_point() and not theirs.is_floating_point():
            not_float.append(key)
        elif theirs.is_floating_point() and not _all_finite(theirs):
            not_finite.append(key)
    if not (not_finite or not_float):
        return
    where = f" {source}" if source is not None else ""
    parts = [f"Checkpoint{where} cannot be used for {name}:"]
    if not_finite:
        n = len(not_finite)
        verb = "tensor holds" if n == 1 else "tensors hold"
        parts.append(f"{n} {verb} NaN or infinite values: {_shortlist(not_finite)};")
    if not_float:
        n = len(not_float)
        verb = "tensor is" if n == 1 else "tensors are"
        dtypes = ", ".join(sorted({str(sd[k].dtype) for k in not_float}))
        parts.append(f"{n} {verb} not floating point ({dtypes}): {_shortlist(not_float)};")
    parts.append(
        "the file is damaged or was saved from a diverged training run. The model was not "
        f"changed. Use the official file (`napari-sam2 download {name} --force`) or weights "
        "saved from an earlier, healthy training step."
    )
    raise CheckpointError(" ".join(parts))


def _all_finite(t: torch.Tensor) -> bool:
    # The sum is NaN or inf whenever an element is, and costs a fraction of isfinite(t); only
    # a non-finite sum (a bad value, or an overflow of large ones) needs the exact check.
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _shortlist(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    rest = len(items) - limit
    return f"{shown} (and {rest} more)" if rest > 0 else shown
