"""The ``napari-sam2`` command (also ``python -m napari_sam2``).

::

    napari-sam2 segment INPUT... --out DIR (--prompts FILE_OR_DIR | --auto) [--format zarr|tiff|ctc|geff] ...
    napari-sam2 evaluate RESULT GT_DIR [--json]
    napari-sam2 convert RESULT OUT [--overwrite]
    napari-sam2 models
    napari-sam2 download NAME

Run ``napari-sam2 segment --help`` for every option. Exit status: 0 when every input succeeded (or
was skipped), 1 when any input failed or the run could not start, 2 for a wrong command line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from .label_formats import LABEL_FORMATS
from .lineage import LOST_AFTER
from .modeling.configs import DEFAULT_MODEL
from .propagation import DIRECTIONS

__all__ = ["main", "build_parser"]

_EPILOG_SEGMENT = """\
inputs: TIFF / OME-TIFF files, Zarr / OME-Zarr stores, folders of frames (one stack per folder),
and globs ("data/*.tif", quoted or expanded by the shell): every input is one stack.

outputs, per input NAME (named after the input): OUT/NAME.ome.zarr, OUT/NAME.tif, the Cell
Tracking Challenge folder OUT/NAME_RES (mask000.tif..., res_track.txt) or the GEFF graph OUT/NAME.geff
with OUT/NAME.ome.zarr (the labels it names), plus OUT/NAME.tracks.csv and
OUT/NAME.manifest.json, published together; OUT/summary.csv gets one row per input and run.
Outputs never replace inputs; --skip-existing never deletes anything (see docs/cli.md).

prompts (--prompts FILE, one file for every input, or a FOLDER with NAME.csv / .json / .tif per input):
  CSV   t,y,x,obj_id,positive           (clicks; napari order; positive 1 = object, 0 = background)
        t,y0,x0,y1,x1,obj_id            (boxes; may share a file with clicks)
  JSON  {"points": [[t, y, x, obj_id, positive], ...], "boxes": [[t, y0, x0, y1, x1, obj_id], ...]}
  TIFF  a label image of one frame: every label is the mask of the object with that id (--mask-frame)

examples:
  napari-sam2 segment data/*.tif --out results --prompts clicks.csv
  napari-sam2 segment 01 02 --out results --auto --auto-param points_per_side=16 --format ctc
  napari-sam2 segment data/*.tif --out results --auto --scheduler tcp://scheduler:8786 --skip-existing
  napari-sam2 segment 01 --out results --auto --detect-new 5 --detect-divisions --format ctc
"""


def _auto_param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. points_per_side=16), got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key, parsed


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="napari-sam2",
        description="SAM2 (Segment Anything in Images and Videos) for microscopy time-lapses.",
    )
    parser.add_argument("--version", action="version", version=f"napari-sam2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    seg = sub.add_parser("segment", help="segment and track objects through stacks",
                         description="Segment and track objects through one or many stacks, one output per input.",
                         epilog=_EPILOG_SEGMENT, formatter_class=argparse.RawDescriptionHelpFormatter)
    seg.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders of frames, Zarr stores or globs")
    seg.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created if missing)")
    how = seg.add_mutually_exclusive_group(required=True)
    how.add_argument("--prompts", metavar="FILE_OR_DIR", help="clicks / boxes (CSV, JSON) or a label TIFF of one frame; "
                     "a folder: one file per input, named after it")
    how.add_argument("--auto", action="store_true", help="no prompts: seed objects on the first frame (--mask-frame) "
                     "with the automatic mask generator and track them all")
    seg.add_argument("--auto-param", action="append", type=_auto_param, default=[], metavar="KEY=VALUE",
                     help="automatic mask generator parameter, repeatable (points_per_side=16, pred_iou_thresh=0.7, "
                     "min_area=50, max_objects=100, ...)")
    seg.add_argument("--format", choices=tuple(LABEL_FORMATS), default="zarr", help="labels as OME-Zarr (default), "
                     "compressed ImageJ TIFF, a Cell Tracking Challenge folder, or a GEFF tracking graph (NAME.geff) "
                     "with the labels as OME-Zarr beside it")
    _add_model_and_plane_options(seg)
    seg.add_argument("--direction", choices=DIRECTIONS, default="both",
                     help="propagate from the earliest prompted frame forward and/or the latest backward (default both)")
    seg.add_argument("--mask-frame", type=_positive_int, default=0, metavar="T",
                     help="frame of a label-image prompt, and the frame seeded by --auto (default 0)")
    seg.add_argument("--detect-new", type=_positive_int, metavar="K", help="every K frames while propagating "
                     "forward, add cells that entered the field (automatic mask generator; --auto-param sets it up)")
    seg.add_argument("--detect-divisions", action="store_true", help="a masklet that splits into two comparable "
                     "parts divides: the parent ends, two daughters start; the lineage goes into the tracks "
                     "(parent column) and res_track.txt")
    seg.add_argument("--lost-after", type=_positive_int, default=LOST_AFTER, metavar="K",
                     help="with --detect-new / --detect-divisions: a cell without a pixel on K consecutive frames "
                     f"has left and its track ends (default {LOST_AFTER}; 0: never end a lost cell)")
    seg.add_argument("--skip-existing", action="store_true", help="skip inputs whose outputs are complete (resume a batch)")
    seg.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    seg.add_argument("--scheduler", metavar="ADDRESS", help="send the inputs as tasks to this Dask distributed "
                     "scheduler (e.g. tcp://10.0.0.5:8786); default: run here, one after the other")
    seg.add_argument("--threads", type=_positive_int, metavar="N", help="torch CPU threads per process")
    seg.add_argument("--no-progress", action="store_true", help="no progress bars")

    ev = sub.add_parser("evaluate", help="score a result (CTC folder, GEFF, OME-Zarr) against ground truth (the "
                        "Cell Tracking Challenge measures)",
                        description="Score a Cell Tracking Challenge result folder (mask000.tif..., res_track.txt), "
                        "a GEFF (NAME.geff, labels beside it) or OME-Zarr labels (NAME.ome.zarr + NAME.tracks.csv) "
                        "against a ground-truth folder (TRA/man_track000.tif..., TRA/man_track.txt, optionally "
                        "SEG/man_seg000.tif...): SEG, DET, TRA, LNK, CT, TF, BC(i), CCA, BIO(i), OP_CSB, OP_CTB, "
                        "OP_CLB(i), CHOTA with py-ctcmetrics (the CTC's implementation), DIV_F1 (division F1) with "
                        "traccuracy. SEG, OP_CSB and OP_CTB need SEG/; a measure that cannot be computed is shown "
                        "as n/a with the reason, never as 0.")
    ev.add_argument("result", metavar="RESULT", help="CTC result folder (e.g. results/01_RES), NAME.geff or "
                    "NAME.ome.zarr")
    ev.add_argument("gt", metavar="GT_DIR", help="CTC ground-truth folder, e.g. 01_GT")
    ev.add_argument("--json", action="store_true", help="print one JSON object {measure: value} of the measures "
                    "computed (the reasons for the others go to stderr)")
    ev.add_argument("--bc", type=_positive_int, default=0, metavar="I", help="tolerance in frames of BC(i), and so "
                    "of BIO(i), OP_CLB(i), and DIV_F1's frame buffer (default 0, as ctc_evaluate's --bc)")
    ev.add_argument("--threads", type=_positive_int, default=1, metavar="N", help="processes matching the frames "
                    "(0: one per CPU; default 1)")

    cv = sub.add_parser("convert", help="convert a result between CTC, GEFF and OME-Zarr + tracks CSV",
                        description="Convert a result: a CTC folder (mask000.tif..., res_track.txt), a GEFF "
                        "(NAME.geff, labels in NAME.ome.zarr beside it) or OME-Zarr labels with NAME.tracks.csv "
                        "beside them. The kind of OUT comes from its name: NAME.geff, NAME.ome.zarr (or .zarr), "
                        "else a CTC folder (e.g. NAME_RES).")
    cv.add_argument("result", metavar="RESULT", help="CTC folder, NAME.geff, or NAME.ome.zarr")
    cv.add_argument("out", metavar="OUT", help="NAME.geff, NAME.ome.zarr, or a CTC folder such as NAME_RES")
    cv.add_argument("--overwrite", action="store_true", help="replace an existing OUT (an earlier result of that kind)")

    emb = sub.add_parser("embed", help="encode stacks' frames into the feature cache ahead of segmenting",
                         description="Run the image encoder over every frame of each stack and keep the features "
                         "in the feature cache, so that clicks in napari and `segment` runs with the same model, "
                         "--image-size, --precision and planes only run the decoder and the memory.")
    emb.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders of frames, Zarr stores or globs")
    _add_model_and_plane_options(emb)  # the same as segment's: the features must be the ones segment reads
    emb.add_argument("--threads", type=_positive_int, metavar="N", help="torch CPU threads")
    emb.add_argument("--no-progress", action="store_true", help="no progress bars")

    from .train.command import add_parser as add_train_parser

    add_train_parser(sub, _add_model_options)

    sub.add_parser("models", help="list the models: name, version, size, cached or not, path",
                   description="List the SAM2 models of the registry and whether their checkpoint is cached.")
    dl = sub.add_parser("download", help="download a model's official checkpoint",
                        description="Download a model's official checkpoint into the cache folder.")
    dl.add_argument("name", metavar="NAME", help="registry name, e.g. sam2.1_hiera_tiny")
    dl.add_argument("--force", action="store_true", help="download again even if cached")
    return parser


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Which network, where and how precisely it runs (segment, embed, train)."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name (see `napari-sam2 models`; default %(default)s)")
    p.add_argument("--checkpoint", metavar="PATH", help="checkpoint file (default: the official one, downloaded once)")
    p.add_argument("--device", choices=("cpu", "cuda", "mps", "auto"), default="auto", help="default %(default)s: cuda > mps > cpu")
    p.add_argument("--image-size", type=int, metavar="N", help="network input size, a multiple of 64 (default 1024; smaller is faster)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="default %(default)s: bf16 on GPUs and CPUs that compute it natively (AMX, AVX-512 BF16), "
                   "else fp32; fp32 gives the reference's numbers exactly")


def _add_model_and_plane_options(p: argparse.ArgumentParser) -> None:
    """Which network, and which frames of the inputs it sees (shared by segment and embed)."""
    _add_model_options(p)
    _add_speed_options(p)
    p.add_argument("--axes", metavar="AXES", help="axes of the inputs, e.g. TYX, TCYX, YXT (default: from the file)")
    p.add_argument("--channel", type=_positive_int, metavar="N", help="channel to segment (multichannel stacks)")
    p.add_argument("--z", type=_positive_int, metavar="N", help="Z plane to segment (stacks with a Z axis)")
    p.add_argument("--z-project", choices=("max", "mean", "min"), help="segment a projection along Z instead")
    p.add_argument("--along", choices=("T", "Z"), type=str.upper, help="propagate through time (T, default) or "
                   "through the planes of a volume (Z)")
    p.add_argument("--t", type=_positive_int, metavar="T", help="time point of the volume for --along Z")


def _add_speed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", metavar="DIR", help="feature cache folder, or 'off' (default: "
                        "$NAPARI_SAM2_FEATURES, else features/ in the cache folder; size cap $NAPARI_SAM2_FEATURES_GB, "
                        "default 20)")


def _feature_cache(value: str | None):
    if value is None:
        return None
    return False if value.strip().lower() in ("off", "none", "no", "0", "false") else os.path.expanduser(value)


def _show_model_log() -> None:
    """The line saying which device and precision run goes to stderr, as the CLI's other notes."""
    import logging

    logger = logging.getLogger("napari_sam2")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("napari-sam2: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _embed(args: argparse.Namespace) -> int:
    from .batch import expand_inputs

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    inputs = expand_inputs(args.inputs)
    failed = [f"{path}: {err}" for path, err in inputs if err]
    todo = [path for path, err in inputs if not err]
    if not todo:
        for line in failed:
            print(f"napari-sam2: error: {line}", file=sys.stderr)
        return 1
    from .api import embed_stack
    from .predictor.video import build_video_predictor

    _show_model_log()
    try:
        predictor = build_video_predictor(args.model, checkpoint=args.checkpoint, device=args.device,
                                          image_size=args.image_size, precision=args.precision,
                                          feature_cache=_feature_cache(args.features))
    except Exception as exc:  # CheckpointError, DownloadError, ValueError (device, precision)
        return _error(f"could not load model {args.model}: {exc}")
    if predictor.feature_cache is None:
        return _error("the feature cache is off (--features off or $NAPARI_SAM2_FEATURES=off): nothing to embed into.")
    for path in todo:
        try:
            done = embed_stack(path, predictor=predictor, axes=args.axes, channel=args.channel, z=args.z,
                               z_project=args.z_project, along=args.along, t=args.t,
                               progress=False if args.no_progress else Path(path).name)
        except Exception as exc:  # noqa: BLE001 - one unreadable stack must not stop the others
            failed.append(f"{path}: {exc}")
            continue
        where = done["location"] or "memory (the cache folder could not be written)"
        print(f"{path}: {done['frames']} frames, {done['encoded']} encoded, {done['cached']} already cached -> {where}")
    for line in failed:
        print(f"napari-sam2: error: {line}", file=sys.stderr)
    return 1 if failed else 0


def _error(message: str) -> int:
    print(f"napari-sam2: error: {message}", file=sys.stderr)
    return 1


def _check_out_dir(out: str) -> str | None:
    """None if the output folder ``out`` exists as a writable folder or can be created; else why not.
    Creates nothing: a run that fails before writing leaves no empty folder behind."""
    path = Path(out).expanduser().absolute()
    if path.is_symlink() and not path.exists():
        return f"the output folder '{out}' is a broken symbolic link. Fix the link or choose another --out."
    if path.exists() and not path.is_dir():
        return f"the output folder '{out}' exists and is not a folder. Choose another --out."
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot write to the output folder '{out}': '{existing}' is not a folder. Choose another --out."
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (it would be created in '{existing}')"
        return f"cannot write to the output folder '{out}'{where}: permission denied. Choose a folder you can write to."
    return None


def _not_regular(path: str, what: str) -> str | None:
    """Why ``path`` (that exists) cannot be read as a ``what`` file: a folder, a FIFO, a device."""
    import stat

    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return f"{what} '{path}' is a folder, not a file"
    kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"{what} '{path}' is {kind}, not a regular file: pass a file"


def _check_checkpoint(path: str) -> str | None:
    if not os.path.exists(path):
        return f"checkpoint file '{path}' does not exist"
    problem = _not_regular(path, "checkpoint")
    if problem and os.path.isdir(path):
        found = sorted(p.name for p in Path(path).glob("*.pt"))[:3]
        hint = f" (it holds {', '.join(found)})" if found else ""
        return f"{problem}: pass the .pt file inside it{hint}, e.g. --checkpoint {Path(path) / (found or ['NAME.pt'])[0]}"
    return problem


def _check_prompts(path: str) -> str | None:
    """Why ``--prompts`` cannot be used (read once here, not once per input)."""
    from .batch import read_prompts
    from .prompts import PromptError

    if not os.path.exists(path):
        return f"prompts file '{path}' does not exist"
    if os.path.isdir(path):
        return None  # a folder with one file per input, read per input
    problem = _not_regular(path, "prompts file")
    if problem:
        return problem
    try:
        read_prompts(path)
    except PromptError as exc:
        return str(exc)
    return None


def _check_planes(args: argparse.Namespace) -> str | None:
    if args.z is not None and args.z_project is not None:
        return "give either --z (one plane) or --z-project (a projection), not both"
    if args.t is not None and args.along != "Z":
        return "--t picks the time point of a volume for --along Z; leave it out otherwise"
    return None


def _segment(args: argparse.Namespace) -> int:
    from .batch import append_summary, check_job_outputs, format_summary, hold_output_folders, make_jobs, run_batch
    from .io.lock import OutputLockedError
    from .modeling.configs import CONFIGS

    # "~" the shell did not expand (--out=~/x, quoted): expanded here, once, for every step alike
    args.out = os.path.expanduser(args.out)
    args.inputs = [os.path.expanduser(p) for p in args.inputs]
    args.prompts = args.prompts and os.path.expanduser(args.prompts)
    args.checkpoint = args.checkpoint and os.path.expanduser(args.checkpoint)

    if args.model not in CONFIGS:
        return _error(f"unknown model {args.model!r}; choose one of: {', '.join(CONFIGS)}")
    if args.image_size is not None and (args.image_size <= 0 or args.image_size % 64):
        return _error(f"--image-size must be a positive multiple of 64, got {args.image_size}")
    if args.auto_param and not (args.auto or args.detect_new):
        return _error("--auto-param goes with --auto or --detect-new")
    if args.detect_new == 0:
        return _error("--detect-new K needs K >= 1 (look for new cells every K frames)")
    if (args.detect_new or args.detect_divisions) and args.direction == "backward":
        return _error("--detect-new / --detect-divisions work while propagating forward: use --direction forward or both")
    if args.overwrite and args.skip_existing:
        return _error("--overwrite and --skip-existing contradict each other: choose one")
    for problem in (args.checkpoint and _check_checkpoint(args.checkpoint), _check_out_dir(args.out),
                    _check_planes(args)):
        if problem:
            return _error(problem)
    auto = dict(args.auto_param) if args.auto else None
    detect_new = None
    if args.detect_new:
        generator = {k: v for k, v in args.auto_param if k != "max_objects"}
        detect_new = {"every": args.detect_new, "generator": generator}
    for params in (auto, detect_new and detect_new["generator"]):
        if params:
            from .predictor.generator_parameters import generator_parameters

            try:
                generator_parameters(params)
            except ValueError as exc:
                return _error(f"--auto-param: {exc}")
    if args.prompts is not None:
        problem = _check_prompts(args.prompts)
        if problem:
            return _error(problem)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = {"model": args.model, "checkpoint": args.checkpoint, "device": args.device, "image_size": args.image_size,
               "precision": args.precision, "feature_cache": _feature_cache(args.features),
               "axes": args.axes, "channel": args.channel, "z": args.z, "z_project": args.z_project,
               "along": args.along, "t": args.t, "direction": args.direction, "mask_frame": args.mask_frame,
               "detect_new": detect_new, "detect_divisions": True if args.detect_divisions else None,
               "lost_after": args.lost_after or None}
    jobs = make_jobs(args.inputs, args.out, fmt=args.format, prompts=args.prompts, auto=auto, options=options,
                     overwrite=args.overwrite, skip_existing=args.skip_existing, threads=args.threads,
                     progress=not args.no_progress)
    # nothing may write over what is read: every input, the prompts, the checkpoint, and the summary
    sources = [j.input for j in jobs] + [p for p in (args.prompts, args.checkpoint) if p]
    problems = [_earlier_results_as_inputs(args.out, [j.input for j in jobs]), _shared_prompts_files(jobs)]
    problems += [check_job_outputs(j, sources) for j in jobs] + [_summary_clash(args.out, sources)]
    for problem in problems:
        if problem:
            return _error(f"{problem}. Nothing was done.")
    try:
        with hold_output_folders(jobs):  # before the model loads: a second run on OUT stops at once
            return _run_held(args, jobs, append_summary, format_summary, run_batch)
    except OutputLockedError as exc:
        return _error(str(exc))
    except OSError as exc:  # the output folder cannot be made
        return _error(str(exc))


def _run_held(args: argparse.Namespace, jobs, append_summary, format_summary, run_batch) -> int:
    import warnings

    predictor = None
    if args.scheduler is None and any(j.error is None for j in jobs):
        from .predictor.video import build_video_predictor

        try:  # once for the whole batch: a missing checkpoint is one clear error, not one per input
            _show_model_log()
            predictor = build_video_predictor(args.model, checkpoint=args.checkpoint, device=args.device,
                                              image_size=args.image_size, precision=args.precision,
                                              feature_cache=_feature_cache(args.features))
        except Exception as exc:  # CheckpointError, DownloadError, ValueError (device)
            return _error(f"could not load model {args.model}: {exc}")
    told: set[str] = set()

    def record(row: dict) -> None:  # as each input finishes: the summary never lags behind the files
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                append_summary(args.out, [row])
            for note in {str(w.message) for w in caught} - told:
                told.add(note)
                print(f"napari-sam2: warning: {note}", file=sys.stderr)
        except OSError as exc:
            print(f"napari-sam2: warning: could not update {Path(args.out) / 'summary.csv'}: {exc}", file=sys.stderr)

    try:
        results = run_batch(jobs, scheduler=args.scheduler, predictor=predictor, progress=not args.no_progress,
                            on_result=record, locked=True)
    except OSError as exc:  # e.g. no scheduler at that address
        return _error(f"could not run on the Dask scheduler {args.scheduler!r}: {exc}")
    print(format_summary(results))
    return 1 if any(r["status"] == "failed" for r in results) else 0


def _earlier_results_as_inputs(out: str, inputs: list[str]) -> str | None:
    """A pattern such as 'data/*.tif' with --out data matches the results of an earlier run: say so."""
    import json

    ours: dict[str, str] = {}
    for manifest in Path(out).glob("*.manifest.json"):
        ours[os.path.realpath(manifest)] = manifest.name
        try:
            files = json.loads(manifest.read_text()).get("files", {})
        except (OSError, ValueError, AttributeError):
            continue
        for entry in files.values() if isinstance(files, dict) else ():
            ours[os.path.realpath(Path(out) / str(entry.get("path", "")))] = manifest.name
    for source in inputs:
        if os.path.realpath(source) in ours:
            return (f"the input '{source}' is a result of an earlier napari-sam2 run (listed in "
                    f"{ours[os.path.realpath(source)]}): narrow the pattern or the inputs to the raw data, or "
                    "write results to another --out")
    return None


def _shared_prompts_files(jobs) -> str | None:
    """With a prompts folder, each input gets the file named after it; two inputs reaching one file is a
    naming clash (e.g. 'a/s0.tif' named a_s0 and 'a_s0.tif'), never silently resolved."""
    from .batch import find_prompts_file

    seen: dict[str, str] = {}
    for job in jobs:
        if job.error or job.prompts is None or not os.path.isdir(job.prompts):
            continue
        try:
            chosen = os.path.realpath(find_prompts_file(job.prompts, job.input, job.name))
        except Exception:  # noqa: BLE001 - a missing prompts file fails that input later, with its message
            continue
        if chosen in seen:
            return (f"the inputs '{seen[chosen]}' and '{job.input}' would both take their prompts from "
                    f"'{chosen}': give each input its own prompts file (named after its output name, see the "
                    "summary) or segment them in separate runs")
        seen[chosen] = job.input
    return None


def _summary_clash(out: str, sources: list[str]) -> str | None:
    summary = os.path.realpath(Path(out) / "summary.csv")
    if any(os.path.realpath(s) == summary for s in sources):
        return f"'{Path(out) / 'summary.csv'}' is an input, and this run would update it: choose another --out"
    return None


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import MEASURES, CTCLayoutError, evaluate_ctc

    try:
        scores = evaluate_ctc(args.result, args.gt, bc_i=args.bc, threads=args.threads)
    except (CTCLayoutError, ImportError) as exc:
        return _error(str(exc))
    if args.json:
        print(json.dumps(dict(scores)))
        # stdout stays one JSON object; why a measure is missing goes next to the errors
        for key, why in scores.absent.items():
            print(f"napari-sam2 evaluate: {key} not computed: {why}", file=sys.stderr)
        return 0
    print(f"{'measure':<8} {'value':>8}  {'library':<14} note")
    for key in MEASURES:
        value = f"{scores[key]:.6f}" if key in scores else "n/a"
        print(f"{key:<8} {value:>8}  {scores.library[key]:<14} {scores.absent.get(key, '')}".rstrip())
    print(f"(BC, BIO, OP_CLB with i = {scores.bc_i}: BC({scores.bc_i}), BIO({scores.bc_i}), OP_CLB({scores.bc_i}); "
          f"DIV_F1 with a frame buffer of {scores.bc_i})")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import ConvertError, convert
    from .io import OutputWriteError

    try:
        done = convert(os.path.expanduser(args.result), os.path.expanduser(args.out), overwrite=args.overwrite)
    except (ConvertError, FileNotFoundError, FileExistsError, OutputWriteError) as exc:
        return _error(str(exc))
    print(f"{args.result} ({done['from']}) -> {' + '.join(done['written'])} ({done['to']}): {done['frames']} frames, "
          f"{done['objects']} objects, {done['divisions']} divisions")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train.command import run

    _show_model_log()
    return run(args, _error)


def _models(args: argparse.Namespace) -> int:
    from .checkpoints import REGISTRY, cache_dir, checkpoint_status
    from .modeling.configs import CONFIGS

    rows = [("name", "version", "size", "cached", "path")]
    problems = []
    for name, entry in REGISTRY.items():
        cfg = CONFIGS[name]
        found, status = checkpoint_status(name)  # hashes an unchecked official file once, then remembers it
        if found is None:
            rows.append((name, cfg.version, cfg.size, "no", str(cache_dir() / entry.filename)))
            continue
        size = f"{cfg.size} ({found.stat().st_size / 2**20:.0f} MiB)"
        if status == "verified" or status.startswith("unverified"):
            rows.append((name, cfg.version, size, "yes", f"{found}  [{status}]"))
        else:  # not the official file, or unreadable: never called cached
            rows.append((name, cfg.version, size, "BAD", str(found)))
            problems.append(f"{name}: {found}: {status}")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
    print(f"\ncache folder: {cache_dir()} (set NAPARI_SAM2_CACHE to change it); ./model is searched too.")
    for problem in problems:
        print(f"napari-sam2: warning: {problem}", file=sys.stderr)
    return 0


def _download(args: argparse.Namespace) -> int:
    from .checkpoints import CheckpointError, download_checkpoint, find_checkpoint, verify_cached
    from .modeling.configs import CONFIGS

    if args.name not in CONFIGS:
        return _error(f"unknown model {args.name!r}; choose one of: {', '.join(CONFIGS)}")
    found = find_checkpoint(args.name)
    if found is not None and not args.force:
        try:
            verify_cached(args.name, found)  # a file that is not the official one is not "already cached"
        except CheckpointError as exc:
            return _error(str(exc))
        print(f"{args.name} is already cached: {found} (use --force to download it again)")
        return 0
    try:
        path = download_checkpoint(args.name, progress=True)
    except CheckpointError as exc:
        return _error(str(exc))
    print(f"{args.name}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``napari-sam2``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    previous = _terminate_like_interrupt()
    try:
        return {"segment": _segment, "embed": _embed, "evaluate": _evaluate, "models": _models,
                "download": _download, "train": _train, "convert": _convert}[args.command](args)
    except KeyboardInterrupt as exc:
        # finally-blocks have removed the unfinished outputs and spill folders on the way out
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"napari-sam2: {how}: finished results were kept, unfinished ones removed; run again with "
              "--skip-existing to do the rest", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what ``kill``, schedulers and job queues send), handled like Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _terminate_like_interrupt():
    """Make SIGTERM unwind like Ctrl-C (Python's default dies on the spot, leaving temporaries behind);
    returns the previous handler, or None where handlers cannot be set (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
