"""Segment many stacks: one output per input, resumable, failures isolated, optionally on Dask.

Used by the ``napari-sam2 segment`` command (:mod:`napari_sam2.cli`); usable from Python too:

>>> jobs = make_jobs(["a.tif", "b.tif"], "results", options={"checkpoint": "ckpt.pt"}, auto={})  # doctest: +SKIP
>>> results = run_batch(jobs)                                                                    # doctest: +SKIP
>>> print(format_summary(results))                                                               # doctest: +SKIP

Every input gives ``OUT/NAME.ome.zarr`` (or ``NAME.tif``, or the CTC folder ``NAME_RES``; with
``NAME.geff`` beside ``NAME.ome.zarr`` for the GEFF format),
``OUT/NAME.tracks.csv`` and ``OUT/NAME.manifest.json``: written in a hidden working folder and
published together, the manifest last, so a result is finished exactly when its manifest matches its
files (``skip_existing``). A batch holds the lock of its output folder, removes what dead runs left
there, and appends one row per input to ``OUT/summary.csv`` as soon as that input is done.
"""

from __future__ import annotations

import glob
import os
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterable
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .io.atomic import remove_stale_partials, write_error
from .io.lock import LOCK_NAME, OutputLock
from .io.result_files import PendingResult, check_complete, fingerprint, manifest_path
from .label_formats import LABEL_FORMATS
from .modeling.configs import DEFAULT_MODEL
from .propagation import VideoPredictorLike

__all__ = [
    "FORMATS", "Job", "expand_inputs", "output_names", "output_paths", "make_jobs",
    "run_one", "run_batch", "summary_frame", "append_summary", "format_summary", "find_prompts_file",
    "check_job_outputs", "read_prompts",
]

FORMATS = tuple(LABEL_FORMATS)
_MODEL_OPTIONS = ("model", "checkpoint", "device", "image_size", "precision", "feature_cache")
_STACK_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr", ".png", ".jpeg", ".jpg")


@dataclass
class Job:
    """One input of a batch and everything needed to segment it (picklable, for Dask workers)."""

    input: str
    name: str
    out_dir: str
    format: str = "zarr"
    prompts: str | None = None
    auto: dict | None = None
    options: dict = field(default_factory=dict)
    overwrite: bool = False
    skip_existing: bool = False
    threads: int | None = None
    progress: bool = True
    error: str | None = None  # known to fail before running (e.g. an input that does not exist)
    run_id: str = ""  # the batch run this job belongs to (in the manifest and the summary)


# ------------------------------------------------------------------------------------ inputs
def expand_inputs(items: Iterable[str]) -> list[tuple[str, str | None]]:
    """``(input, error)`` per input: existing files and folders as they are, globs expanded (in
    natural order), and an error for names that match nothing. Duplicates are dropped."""
    from .io.frame_folder import natural_key

    out: list[tuple[str, str | None]] = []
    seen: set[str] = set()

    def add(path: str, error: str | None = None) -> None:
        key = os.path.abspath(path) if error is None else path
        if key not in seen:
            seen.add(key)
            out.append((path, error))

    for item in items:
        text = os.fspath(item)
        if os.path.exists(text):
            add(text)
        elif any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text), key=lambda p: natural_key(os.path.basename(p)))
            matches = [m for m in matches if not os.path.basename(m).startswith(".")]
            if not matches:
                add(text, f"no files match the pattern '{text}'")
            for m in matches:
                add(m)
        else:
            add(text, f"input '{text}' does not exist (working directory: '{os.getcwd()}')")
    return out


def _stem(path: str) -> str:
    name = os.path.basename(os.path.normpath(path)) or "input"
    lower = name.lower()
    for suffix in _STACK_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0] or name


def output_names(inputs: list[str]) -> list[str]:
    """An output name per input, named after it (``movie.ome.tif`` -> ``movie``); inputs with the same
    name get their parent folder's name as prefix (``01/t.tif``, ``02/t.tif`` -> ``01_t``, ``02_t``)."""
    names = [_stem(p) for p in inputs]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    out = []
    for path, n in zip(inputs, names):
        if counts[n] > 1:
            parent = os.path.basename(os.path.dirname(os.path.abspath(os.path.normpath(path))))
            n = f"{parent}_{n}" if parent else n
        out.append(n)
    final, used = [], set()
    for n in out:
        candidate, k = n, 2
        while candidate in used:
            candidate, k = f"{n}_{k}", k + 1
        used.add(candidate)
        final.append(candidate)
    return final


def output_paths(out_dir: str | os.PathLike, name: str, fmt: str) -> dict[str, Path]:
    """``{"labels": ..., "tracks": ...}`` of one input's outputs."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out_dir)
    if fmt == "geff":  # the graph, and the labels it names beside it
        return {"labels": out / f"{name}.ome.zarr", "geff": out / f"{name}.geff", "tracks": out / f"{name}.tracks.csv"}
    return {"labels": out / f"{name}{LABEL_FORMATS[fmt]}", "tracks": out / f"{name}.tracks.csv"}


def find_prompts_file(prompts: str | None, input_path: str, name: str) -> str | None:
    """The prompts file of one input: ``prompts`` itself, or, when it is a folder, the file there
    named after the input (``NAME.csv``, ``.json``, ``.tif`` or ``.tiff``)."""
    from .prompts import PROMPT_FILE_SUFFIXES, PromptError

    if prompts is None or not os.path.isdir(prompts):
        return prompts
    stems = [name, _stem(input_path), os.path.basename(os.path.normpath(input_path))]
    tried = []
    for stem in dict.fromkeys(stems):
        for suffix in PROMPT_FILE_SUFFIXES:
            candidate = os.path.join(prompts, stem + suffix)
            tried.append(os.path.basename(candidate))
            if os.path.isfile(candidate):
                return candidate
    raise PromptError(f"no prompts file for input '{input_path}' in folder '{prompts}' (looked for {', '.join(tried)})")


def make_jobs(items: Iterable[str], out_dir: str | os.PathLike, *, fmt: str = "zarr", prompts: str | None = None,
              auto: dict | None = None, options: dict | None = None, overwrite: bool = False,
              skip_existing: bool = False, threads: int | None = None, progress: bool = True) -> list[Job]:
    """One :class:`Job` per input (see :func:`expand_inputs`); ``options`` are :func:`segment_stack`
    keyword arguments (``model``, ``checkpoint``, ``device``, ``image_size``, ``axes``, ``channel``,
    ``direction``, ``mask_frame``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    expanded = expand_inputs(items)
    names = output_names([p for p, _ in expanded])
    run_id = time.strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]
    return [Job(input=p, name=n, out_dir=os.fspath(out_dir), format=fmt, prompts=prompts, auto=auto,
                options=dict(options or {}), overwrite=overwrite, skip_existing=skip_existing, threads=threads,
                progress=progress, error=err, run_id=run_id)
            for (p, err), n in zip(expanded, names)]


# ------------------------------------------------------------------------------------ running
_PREDICTORS: dict[tuple, Any] = {}
_PREDICTORS_LOCK = threading.Lock()


def _predictor(options: dict):
    """One video predictor per model setting per process (a Dask worker keeps its model)."""
    from .predictor.video import build_video_predictor

    key = tuple(str(options.get(k)) for k in _MODEL_OPTIONS)
    with _PREDICTORS_LOCK:  # a worker with several threads builds its model once
        if key not in _PREDICTORS:
            _PREDICTORS.clear()  # one model at a time is enough
            _PREDICTORS[key] = build_video_predictor(
                options.get("model") or DEFAULT_MODEL, checkpoint=options.get("checkpoint"),
                device=options.get("device") or "auto", image_size=options.get("image_size"),
                precision=options.get("precision") or "auto", feature_cache=options.get("feature_cache"),
            )
        return _PREDICTORS[key]


def _describe(exc: BaseException) -> str:
    from .checkpoints import CheckpointError
    from .io import OutputWriteError, StackReadError
    from .prompts import PromptError

    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, (PromptError, StackReadError, OutputWriteError, CheckpointError, FileNotFoundError,
                        FileExistsError, ValueError)):
        return text
    return f"{type(exc).__name__}: {text}"


def _result(job: Job, status: str, start: float, **kw) -> dict:
    row = {"run": job.run_id, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "input": job.input, "name": job.name,
           "status": status, "frames": None, "objects": None,
           "seconds": round(time.perf_counter() - start, 2), "output": None, "error": None, "warnings": []}
    row.update(kw)
    return row


def _kind_problem(path: Path, want_dir: bool) -> str | None:
    """Why an existing ``path`` cannot be replaced by an output of the other kind (file vs folder)."""
    if not (path.exists() or path.is_symlink()):
        return None
    is_dir = path.is_dir() and not path.is_symlink()
    if is_dir == want_dir:
        return None
    what, wanted = ("a folder", "a file") if is_dir else ("a regular file", "a folder")
    return (f"'{path}' exists and is {what}, but this output is {wanted}: it is not an earlier result of "
            "napari-sam2 and --overwrite does not replace it. Move it away or choose another --out")


def check_job_outputs(job: Job, inputs: Iterable[str] = ()) -> str | None:
    """Why the outputs of ``job`` must not be written, before any work: an output that is, holds or lies
    inside one of ``inputs`` (the job's own input always counts), or an existing path of another kind."""
    paths = output_paths(job.out_dir, job.name, job.format)
    outputs = [*paths.values(), manifest_path(job.out_dir, job.name)]
    for source in dict.fromkeys([job.input, *inputs]):
        if not source or not os.path.lexists(source):
            continue
        src = Path(os.path.realpath(source))
        out_dir = Path(os.path.realpath(job.out_dir))
        if src.is_dir() and (src == out_dir or src in out_dir.parents):
            return (f"the output folder '{job.out_dir}' is inside the input '{source}' (a folder that is read): "
                    "choose an --out folder outside the inputs")
        for out in outputs:
            dst = Path(os.path.realpath(out))
            if dst == src or src in dst.parents or dst in src.parents:
                return (f"the output '{out}' would overwrite the input '{source}': choose an --out folder "
                        "outside the inputs")
    if job.overwrite:
        return (_kind_problem(paths["labels"], want_dir=job.format != "tiff") or _kind_problem(paths["tracks"], False)
                or ("geff" in paths and _kind_problem(paths["geff"], want_dir=True)) or None)
    return None


def run_one(job: Job, predictor: VideoPredictorLike | None = None) -> dict:
    """Segment one input and publish its outputs together; never raises for a bad input.

    Outputs appear only complete (see :mod:`napari_sam2.io.result_files`); inputs, and earlier results
    unless ``overwrite``, are never touched. With ``skip_existing`` a complete result of the same input
    is skipped and anything else already there is left alone and reported.

    Returns
    -------
    dict
        ``input, name, status ("ok", "skipped", "failed"), frames, objects, seconds, output, error,
        warnings`` (e.g. automatic seeding found no object).
    """
    start = time.perf_counter()
    if job.error:
        return _result(job, "failed", start, error=job.error)
    paths = output_paths(job.out_dir, job.name, job.format)
    problem = check_job_outputs(job)
    if problem:
        return _result(job, "failed", start, error=problem)
    present = [p for p in paths.values() if p.exists() or p.is_symlink()]
    settings = result_settings(job)  # what the result depends on, as it is when the run starts
    if job.skip_existing and present:
        why = check_complete(job.out_dir, job.name, paths, job.input, settings)
        if why is None:
            return _result(job, "skipped", start, output=str(paths.get("geff", paths["labels"])))
        return _result(job, "failed", start, error=(
            f"the result '{job.name}' in '{job.out_dir}' is not a complete result of this input and these "
            f"settings: {why}. Nothing was changed. Rerun with --overwrite to replace it, or remove "
            f"{', '.join(p.name for p in present)}"))
    if present and not job.overwrite:
        return _result(job, "failed", start, error=(
            f"'{present[0]}' already exists; use --skip-existing to keep finished outputs or --overwrite to "
            "replace them"))
    pending = None
    try:
        if job.threads:
            import torch

            torch.set_num_threads(int(job.threads))
        kwargs = {k: v for k, v in job.options.items() if k not in _MODEL_OPTIONS and v is not None}
        prompts_file = find_prompts_file(job.prompts, job.input, job.name)
        if prompts_file is not None:
            kwargs.update(read_prompts(prompts_file))
        else:
            kwargs["auto"] = job.auto or None
        model = predictor if predictor is not None else _predictor(job.options)
        progress = job.name if job.progress else False
        pending = PendingResult(job.out_dir, job.name, paths)
        with warnings.catch_warnings(record=True) as caught:  # reported in the summary, not as tracebacks
            warnings.simplefilter("always", RuntimeWarning)
            try:
                result = _segment(job, pending, model, progress, kwargs)
                result.to_csv(pending.path("tracks"))
            except OSError as exc:
                if isinstance(exc, FileNotFoundError) or not pending.owns(exc.filename):
                    raise
                raise write_error(exc, pending.final_for(exc.filename)) from exc  # name what the user asked for
        notes = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)))
        pending.publish(job.overwrite, {
            "run": job.run_id, "input": os.path.realpath(job.input), "input_fingerprint": fingerprint(job.input),
            "settings": settings, "prompts": prompts_file,
            "frames": result.n_frames, "objects": result.n_objects,
            "model": {k: job.options.get(k) for k in _MODEL_OPTIONS}, "napari_sam2": _version()})
        return _result(job, "ok", start, frames=result.n_frames, objects=result.n_objects,
                       output=str(paths.get("geff", paths["labels"])), warnings=notes)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - a failing input must not stop the batch
        if os.environ.get("NAPARI_SAM2_DEBUG"):
            traceback.print_exc()
        return _result(job, "failed", start, error=_describe(exc))
    finally:
        if pending is not None:
            pending.discard()


def result_settings(job: Job) -> dict:
    """What a result depends on besides its input, as JSON values (compared by ``skip_existing``): the
    segmentation options, the prompts file and checkpoint file (path and fingerprint), the seeding."""
    import json

    def file_id(path):
        try:
            return [os.path.realpath(path), fingerprint(path)] if path else None
        except OSError:
            return [os.path.realpath(path), None]

    try:
        prompts = file_id(find_prompts_file(job.prompts, job.input, job.name))
    except Exception:  # noqa: BLE001 - the run itself reports a prompts file it cannot find
        prompts = None
    # the device and the feature cache are left out: a result is the same wherever it was computed
    options = {k: v for k, v in sorted(job.options.items()) if v is not None and k not in ("device", "feature_cache")}
    settings = {"format": job.format, "options": options, "prompts": prompts, "auto": job.auto,
                "checkpoint": file_id(job.options.get("checkpoint"))}
    return json.loads(json.dumps(settings, default=str))  # tuples and lists compare alike after a round trip


def read_prompts(path: str) -> dict:
    """The prompts of a prompts file as :func:`segment_stack` keyword arguments; a file without any
    prompt is an error (automatic seeding is asked for with --auto, never implied)."""
    from .prompts import PromptError, read_prompts_file

    prompts = {k: v for k, v in read_prompts_file(path).items() if v is not None}
    masks = prompts.get("masks")
    if not any(len(v) for k, v in prompts.items() if k != "masks") and (masks is None or not np.any(masks)):
        raise PromptError(f"prompts file '{path}' holds no prompt (no click, no box, no labelled pixel): add "
                          "prompts to it, or use --auto instead of --prompts to seed objects automatically")
    return prompts


def _version() -> str:
    from . import __version__

    return __version__


def _segment(job: Job, pending: PendingResult, model: VideoPredictorLike, progress, kwargs: dict):
    """Run segment_stack for one job, writing its labels in the job's format into ``pending``."""
    from .api import segment_stack

    if job.format in ("zarr", "geff"):
        result = segment_stack(job.input, out=pending.path("labels"), predictor=model, progress=progress, **kwargs)
        if job.format == "geff":
            result.to_geff(pending.path("geff"))  # names the labels beside it, as they will be once published
        return result
    # labels stream into a zarr store first (frames come in any order), then to TIFF / CTC
    result = segment_stack(job.input, out=pending.scratch("labels.ome.zarr"), predictor=model, progress=progress,
                           **kwargs)
    if job.format == "tiff":
        result.to_tiff(pending.path("labels"))
    else:
        result.to_ctc(pending.path("labels"))
    return result


def run_batch(jobs: list[Job], scheduler: str | None = None, predictor: VideoPredictorLike | None = None,
              progress: bool = True,
              on_result: Callable[[dict], Any] | None = None, locked: bool = False) -> list[dict]:
    """Run every job; returns one result per job, in the jobs' order.

    ``scheduler``: the address of a running Dask distributed scheduler (e.g. ``"tcp://10.0.0.5:8786"``);
    every input becomes one task there. ``None``: one after the other in this process, sharing
    ``predictor`` (built once when not given). ``on_result(row)`` is called as each input finishes.
    ``locked``: the caller already holds the output folders (:func:`hold_output_folders`).

    Raises
    ------
    napari_sam2.io.lock.OutputLockedError
        Another run is writing to one of the output folders (nothing was done).
    """
    from tqdm.auto import tqdm

    results: list[dict | None] = [None] * len(jobs)

    def done(i: int, row: dict) -> None:
        results[i] = row
        if on_result is not None:
            on_result(row)

    with ExitStack() as held:
        if not locked:
            held.enter_context(hold_output_folders(jobs))
        with tqdm(total=len(jobs), desc="inputs", unit="stack", disable=not progress, position=0) as bar:
            if scheduler is None:
                for i, job in enumerate(jobs):
                    done(i, run_one(job, predictor=predictor))
                    bar.update(1)
                    bar.set_postfix_str(f"{sum(r['status'] == 'failed' for r in results if r)} failed")
            else:
                from distributed import Client, as_completed

                with Client(scheduler, timeout="30s") as client:
                    remote = [Job(**{**asdict(j), "progress": False}) for j in jobs]
                    futures = {client.submit(run_one, job, pure=False, key=f"napari-sam2-{i}-{job.name}"): i
                               for i, job in enumerate(remote)}
                    for future in as_completed(futures):
                        i = futures[future]
                        try:
                            row = future.result()
                        except Exception as exc:  # a worker died, or the task could not run at all
                            row = _result(jobs[i], "failed", time.perf_counter(),
                                          error=f"task failed on the cluster: {_describe(exc)}")
                            row["seconds"] = None
                        done(i, row)
                        bar.update(1)
    return [r for r in results if r is not None]


@contextmanager
def hold_output_folders(jobs: list[Job]):
    """Create and lock the output folders of ``jobs`` (one run at a time per folder), and remove what dead
    runs left there and in the temp folder. A folder created here and still empty on leaving is removed:
    a run that fails before writing leaves nothing behind."""
    from .predictor.store import remove_stale_spill_dirs

    created: list[Path] = []
    with ExitStack() as held:
        for out_dir in dict.fromkeys(Path(j.out_dir) for j in jobs):
            if not out_dir.exists():
                created.append(out_dir)
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise write_error(exc, out_dir) from exc
            held.enter_context(OutputLock(out_dir / LOCK_NAME, what=f"the output folder '{out_dir}'"))
            remove_stale_partials(out_dir)  # under the lock: no live run of ours writes there
        remove_stale_spill_dirs()
        try:
            yield
        finally:
            held.close()
            for out_dir in created:
                try:
                    out_dir.rmdir()  # only if empty
                except OSError:
                    pass


# ------------------------------------------------------------------------------------ summary
SUMMARY_NAME = "summary.csv"
SUMMARY_COLUMNS = ["run", "finished", "input", "status", "frames", "objects", "seconds", "output", "error",
                   "warnings"]


def summary_frame(results: list[dict]):
    """The results as a pandas DataFrame (columns :data:`SUMMARY_COLUMNS`)."""
    import pandas as pd

    rows = [{**{c: r.get(c) for c in SUMMARY_COLUMNS}, "warnings": "; ".join(r.get("warnings") or []) or None}
            for r in results]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def append_summary(out_dir: str | os.PathLike, results: list[dict]) -> Path:
    """Add rows to ``OUT/summary.csv``, the record of every run on that folder (one row per input and
    run, newest last); the file is replaced whole, so it is never left half-written. A summary with other
    columns (another version's) is kept as ``summary.DATE.csv`` and a new one started."""
    from .io.atomic import atomic_path

    path = Path(out_dir) / SUMMARY_NAME
    if path.is_symlink() or (path.exists() and not path.is_file()):
        # never write through a link or over a folder of the user's: this run's record goes beside it
        path = path.with_name(f"summary.{results[0].get('run') or 'run'}.csv" if results else "summary.run.csv")
        warnings.warn(f"'{Path(out_dir) / SUMMARY_NAME}' is not a regular file: it was left alone and the summary "
                      f"was written to '{path}'", RuntimeWarning, stacklevel=2)
    previous = b""
    if path.is_file():
        previous = path.read_bytes()
        if previous.split(b"\n", 1)[0].decode(errors="replace").strip() != ",".join(SUMMARY_COLUMNS):
            stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(path.stat().st_mtime))
            os.replace(path, path.with_name(f"summary.{stamp}.csv"))
            previous = b""
    if previous and not previous.endswith(b"\n"):
        previous += b"\n"
    table = summary_frame(results).to_csv(index=False, header=not previous).encode()
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_bytes(previous + table)
    return path


def format_summary(results: list[dict]) -> str:
    """A plain-text table: input, status, frames, objects, seconds, output or error."""
    header = ["input", "status", "frames", "objects", "seconds", "output or error"]
    rows = []
    for r in results:
        def cell(v, fmt="{}"):
            return "-" if v is None else fmt.format(v)
        rows.append([r["input"], r["status"], cell(r.get("frames")), cell(r.get("objects")),
                     cell(r.get("seconds"), "{:.1f}"), r.get("error") or r.get("output") or "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)][:-1]
    lines = []
    for row in [header] + rows:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(row[:-1], widths)) + "  " + str(row[-1]))
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    n_ok = sum(r["status"] == "ok" for r in results)
    n_skip = sum(r["status"] == "skipped" for r in results)
    n_fail = sum(r["status"] == "failed" for r in results)
    for r in results:
        for note in r.get("warnings") or []:
            lines.append(f"warning: {r['input']}: {note}")
    lines.append(f"{len(results)} inputs: {n_ok} ok, {n_skip} skipped, {n_fail} failed")
    return "\n".join(lines)
