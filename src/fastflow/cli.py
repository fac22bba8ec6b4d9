"""The command line: ``fastflow <command> ...`` (also ``python -m fastflow``).

    fastflow train    --data ROOT --category NAME [--format mvtec|btad|folder|mtd|cifar10] \\
                      [--backbone efficientnet_lite0] [--epochs N] --output RUN_DIR
    fastflow train    --resume RUN_DIR
    torchrun --nproc_per_node N -m fastflow train ...   (several processes; see distributed.py)
    fastflow evaluate RUN_DIR --data ROOT --category NAME [--output metrics.json] [--report] [--misalign]
    fastflow predict  RUN_DIR IMAGE_OR_FOLDER... --output OUT_DIR [--threshold T] [--runtime torch|onnx]
    fastflow export   RUN_DIR --format onnx [--output model.onnx] [--quantize int8 --calibration DIR]
    fastflow serve    RUN_DIR [--host 127.0.0.1] [--port 8000] [--runtime torch|onnx]   (web page and JSON API)
    fastflow invert   RUN_DIR IMAGE --region x0,y0,x1,y1 --output OUT_DIR [--strength S] [--level L (1: finest)]
    fastflow calibrate RUN_DIR --normal-dir DIR [--false-alarm-rate R]
    fastflow info     RUN_DIR [--json]
    fastflow benchmark RUN_DIR [--batch-size B] [--iterations N] [--warmup W] [--images DIR] [--json FILE]
    fastflow presets  [--json]
    fastflow demo     [--output DIR]
    (train, evaluate, predict, export, invert, benchmark, demo: [--device auto|cpu|cuda|cuda:N|mps] [--threads N]
     and, but for export, [--precision fp32|bf16|fp16]; see device.py)

Every command also takes --config FILE (its options from a TOML or YAML file; config_file.py) and
--log-file FILE (what it prints, appended to FILE; log_file.py).

A user mistake (missing path, bad option, unreadable file, unusable checkpoint) ends with one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import traceback
from dataclasses import replace

from .config import AUTO_CANDIDATES, DEFAULT_PRESET, PRESETS, ModelConfig, TrainConfig, check_levels, from_dict, to_dict


# -- shared option groups ---------------------------------------------------------------------
def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required,
                   help="dataset root folder (folder format: the folder --normal-dir is relative to, default .)")
    g.add_argument("--category", required=required,
                   help="category name, a comma-separated list, or 'all' (folder format: a name, default "
                        "--data's folder name)")
    g.add_argument("--format", default="mvtec", choices=["mvtec", "btad", "folder", "mtd", "cifar10"],
                   help="dataset layout (default: mvtec; evaluate: the run's)")
    g.add_argument("--normal-dir", action="append", default=None, help="folder format: normal images (repeatable)")
    g.add_argument("--abnormal-dir", action="append", default=None,
                   help="folder format: anomalous images (repeatable)")
    g.add_argument("--mask-dir", default=None, help="folder format: folder of masks (default: beside images)")
    g.add_argument("--mask-suffix", default=None,
                   help="folder format: mask name = image stem + suffix, e.g. _mask.png (default: .png)")
    g.add_argument("--test-fraction", type=float, default=None,
                   help="folder format: fraction of the normal images kept for test (default: 0.2)")


def _add_compute_args(p: argparse.ArgumentParser, precision: bool = True) -> None:
    """--device, --precision and --threads (device.py): where and how a verb computes."""
    g = p.add_argument_group("compute")
    g.add_argument("--device", default="auto",
                   help="auto (default: the first GPU if there is one, else the CPU), cpu, cuda, cuda:N or mps")
    if precision:
        g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                       help="fp32 (default); bf16/fp16 run the backbone and flows under autocast (GPU; bf16 "
                            "also on the CPU), the log-dets, loss and map stay float32")
    g.add_argument("--threads", type=_positive(int), default=None,
                   help="CPU threads (default: the CPUs this process may use, or OMP_NUM_THREADS)")


def _compute(args) -> tuple:
    """(torch.device, precision) from --device / --precision; a DeviceError (exit 2) if unavailable."""
    from .device import check_precision, resolve_device

    device = resolve_device(args.device)
    precision = getattr(args, "precision", "fp32")
    check_precision(precision, device)
    return device, precision


def _data_options(args) -> dict:
    opts = {}
    if args.format == "folder":
        for key in ("normal_dir", "abnormal_dir"):
            if getattr(args, key):
                opts[key + "s"] = getattr(args, key)
        for key in ("mask_dir", "mask_suffix", "test_fraction"):
            if getattr(args, key) is not None:
                opts[key] = getattr(args, key)
    return opts


def _folder_defaults(args) -> None:
    """The folder format names its folders with --normal-dir/--abnormal-dir (relative to --data or absolute):
    --data defaults to the current folder and --category (only a name there) to --data's folder name."""
    if args.format != "folder":
        return
    if not args.data:
        args.data = "."
    if not args.category:
        from .data import list_categories

        args.category = list_categories("folder", args.data)[0]


def _categories(args) -> list[str]:
    from .data import list_categories

    if args.category == "all":
        cats = list_categories(args.format, args.data)
        if not cats:
            raise ValueError(f"no categories found under {args.data!r} for format {args.format!r}")
        return cats
    cats = [c for c in args.category.split(",") if c]
    paths = [c for c in cats if c in (".", "..") or "/" in c or os.sep in c]
    if paths:  # a name becomes a sub-folder of --output: it must not point elsewhere
        raise ValueError(f"--category takes folder names, not paths: got {', '.join(paths)}; put the parent "
                         f"folder in --data and the name in --category")
    return cats


def _positive(kind):
    def check(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return check


def _region(text: str) -> tuple[float, float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 4 or parts[0] >= parts[2] or parts[1] >= parts[3]:
        raise argparse.ArgumentTypeError(f"region must be x0,y0,x1,y1 with x0 < x1 and y0 < y1, got {text!r}")
    return parts


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",") if p]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 16:
        raise argparse.ArgumentTypeError(f"input size must be N or H,W with values >= 16, got {text!r}")
    return tuple(parts)


def _levels(text: str) -> tuple[int, ...]:
    try:
        return check_levels([p for p in text.split(",") if p.strip()], shown=repr(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _weights(text: str) -> tuple[float, ...]:
    """--map-weights' value: positive numbers separated by commas."""
    try:
        weights = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        weights = ()
    if not weights or min(weights) <= 0:
        raise argparse.ArgumentTypeError(f"weights must be positive numbers like 1,3, got {text!r}")
    return weights


def _cutoff(text: str) -> float | str:
    """--autocontrast's value: a percent, or 'off' (overrides a preset that stretches)."""
    if text.strip().lower() in ("off", "none"):
        return "off"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percent like 1 or 'off', got {text!r}") from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (unless None/False, or the help already names it) and keeps the line
    breaks of descriptions and epilogs."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or "default" in text \
                or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and whose help shows defaults (subcommand parsers inherit
    the class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        if kwargs.get("description") and "\n" not in kwargs["description"]:  # raw formatting keeps line breaks
            import textwrap

            kwargs["description"] = textwrap.fill(kwargs["description"], 79)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


# -- commands ---------------------------------------------------------------------------------
def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastflow", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train_parser, _add_evaluate_parser, _add_invert_parser, _add_predict_parser,
                _add_export_parser, _add_serve_parser, _add_presets_parser, _add_calibrate_parser,
                _add_info_parser, _add_benchmark_parser, _add_demo_parser):
        add(sub)
    for verb in sub.choices.values():
        _add_run_file_args(verb)
    return parser


def _add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model on normal images", description=(
        "Train a FastFlow model on normal (defect-free) images and write a run folder: model.pt (the model and its "
        "calibrated threshold), checkpoint.pt (for --resume), history.json and run.json. Options left out take the "
        "preset's values (fastflow presets lists them)."),
        epilog="examples:\n  fastflow train --data data/mvtec_ad --category bottle --output runs/bottle\n"
               "  fastflow train --format folder --normal-dir good/ --abnormal-dir bad/ --output runs/mine\n"
               "  fastflow train --resume runs/bottle [--epochs N]")
    _add_data_args(t, required=False)
    t.add_argument("--output", help="run folder to write (for several categories: one subfolder each)")
    t.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its last checkpoint, with the options it was started "
                        "with; --epochs N extends a finished run to N epochs")
    _add_train_length_args(t)
    _add_train_model_args(t)
    t.add_argument("--augment", nargs="?", const="paper", default=None, choices=["paper", "pose"],
                   help="training augmentation: 'paper' (the default when given; Section 6.2: flips, rotation) or "
                        "'pose' (random zoom 0.85-1.18, rotation +-15 degrees, shift 15%%: parts that are not "
                        "aligned, README)")
    t.add_argument("--no-cache", action="store_true", help="recompute backbone features every epoch")
    t.add_argument("--val-fraction", type=float, default=None,
                   help="normal training images held out to select the epoch and calibrate the threshold "
                        "(default: 0.1)")
    t.add_argument("--val-min", type=int, default=None,
                   help="hold out at least this many normal images, never more than a fifth of them (default: 8; "
                        "0: --val-fraction alone)")
    t.add_argument("--false-alarm-rate", type=float, default=None,
                   help="threshold calibration on held-out normals (default 0.01)")
    t.add_argument("--keep-epoch", choices=["best", "last"], default=None,
                   help="the epoch each level's flow keeps: its lowest held-out NLL (paper presets) or the last "
                        "one within 0.5 nats/dim of its lowest (lite presets: their step budget is the stopping "
                        "rule; a flow that diverges falls back, the others keep their last epoch)")
    t.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    t.add_argument("--evaluate", action="store_true", help="evaluate on the test split after training")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_compute_args(t)
    t.add_argument("--overwrite", action="store_true",
                   help="train into a folder that already holds a run: delete that run's model, checkpoint, "
                        "exports and metrics first (without it such a folder is refused)")


def _add_train_length_args(t: argparse.ArgumentParser) -> None:
    """train: the preset, its weights and the optimisation (how long, how fast)."""
    t.add_argument("--backbone", default=None,
                   help=f"preset / backbone: auto (the default: chooses among {', '.join(AUTO_CANDIDATES)} "
                        f"on synthetic defects pasted on held-out normal images), {', '.join(PRESETS)}")
    t.add_argument("--weights", default="pretrained",
                   help="backbone weights: pretrained (default), random, or a local .pth state dict")
    t.add_argument("--epochs", type=int, default=None,
                   help="train exactly N epochs (default: the preset's own length: a step budget for the lite "
                        "presets, a fixed epoch count for the paper's)")
    t.add_argument("--steps", type=int, default=None,
                   help="optimiser-step budget: as many epochs as reach it (at most --epochs when both are given)")
    t.add_argument("--batch-size", type=int, default=None, help="images per optimiser step (default: the preset's)")
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the preset's, 1e-3)")
    t.add_argument("--weight-decay", type=float, default=None, help="Adam weight decay (default: the preset's, 1e-5)")
    t.add_argument("--grad-clip", type=float, default=None,
                   help="max gradient norm per feature dimension (default 0 = off); e.g. 1 against spikes")
    t.add_argument("--feature-noise", type=float, default=None,
                   help="noise regularisation: Gaussian noise x each level's feature std added to the training "
                        "features (lite presets 0.2, paper presets 0 = off)")


def _add_train_model_args(t: argparse.ArgumentParser) -> None:
    """train: the model's shape, its anomaly map and the preprocessing saved with it."""
    t.add_argument("--input-size", type=_size, default=None, help="N or H,W (default: the preset's)")
    t.add_argument("--flow-steps", type=int, default=None, help="flow steps per level (default: the preset's)")
    t.add_argument("--hidden-ratio", type=float, default=None,
                   help="subnet hidden channels / input channels (default: the preset's)")
    t.add_argument("--kernels", choices=["3-1", "3-3"], default=None,
                   help="subnet kernels: 3-1 alternates 3x3 and 1x1 steps, 3-3 is 3x3 only (default: the preset's)")
    t.add_argument("--levels", type=_levels, default=None,
                   help="backbone feature levels, one flow each (CNN: 1=stride 4, 2=stride 8, 3=stride 16, "
                        "4=stride 32)")
    t.add_argument("--map-levels", type=_levels, default=None,
                   help="the levels whose maps make the anomaly map (default: every level; --levels alone resets "
                        "a preset's roles; overrides --choose-map)")
    t.add_argument("--map-weights", type=_weights, default=None,
                   help="the map levels' weights, one per map level (--map-levels, else every level), e.g. 1,3: "
                        "the second level's map counts 3x the first's (default: equal; overrides --choose-map)")
    t.add_argument("--choose-map", action=argparse.BooleanOptionalAction, default=None,
                   help="after training, choose which levels make the anomaly map: the finest level, the two "
                        "finest (also with the second weighted 2x or 3x), ... or all, by AUPRO on synthetic defects "
                        "pasted on the held-out normal images (a lead over 0.01 needed, and no loss of over 0.01 in "
                        "their pixel AUROC; the image score is kept; shown by fastflow info). Default: on for the "
                        "lite presets; --no-choose-map keeps the preset's map")
    t.add_argument("--border-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="with --choose-map, the chosen map may subtract the held-out normal images' mean at each "
                        "distance from the image border, when that localises the synthetic defects better (default: "
                        "on; --no-border-correction when defects on the image's edge matter most)")
    t.add_argument("--score-levels", type=_levels, default=None,
                   help="the levels whose own map's max is the image score (default: the anomaly map's max; "
                        "lite0_unaligned_fine chooses after training between its stride-32 flow and the map's max, "
                        "on synthetic defects: naming the levels skips that choice)")
    t.add_argument("--no-norm-affine", action="store_true",
                   help="LayerNorm without its learned per-location affine: position-free, and the loss stays a "
                        "proper likelihood; for parts that are not aligned (Magnetic Tile: README)")
    t.add_argument("--anomaly-map", choices=["loglik", "reference"], default=None,
                   help="loglik: per-location negative log-likelihood; reference: the peers' map (default: loglik)")
    t.add_argument("--smoothing-sigma", type=float, default=None,
                   help="Gaussian blur of the anomaly map, in input pixels; 0 = off (default: the preset's)")
    t.add_argument("--autocontrast", type=_cutoff, nargs="?", const=1.0, default=None, metavar="CUTOFF",
                   help="stretch each image's contrast before resizing, clipping CUTOFF percent of the darkest and "
                        "brightest pixels (default 1 when given; 'off' to switch a preset's off); saved with the "
                        "model's preprocessing. For dark, low-contrast parts (Magnetic Tile: README)")
    t.add_argument("--equalize", action="store_true",
                   help="equalise each image's histogram (per channel) before resizing, instead of a preset's "
                        "--autocontrast; saved with the model's preprocessing")


def _add_evaluate_parser(sub) -> None:
    e = sub.add_parser("evaluate", help="metrics of a trained run on a labelled test set", description=(
        "Image AUROC, pixel AUROC, AUPRO and F1-max of a trained run on the test split of a labelled dataset. "
        "--data, --category and --format default to those the run was trained with (its run.json)."),
        epilog="example:\n  fastflow evaluate runs/bottle --report")
    e.add_argument("run_dir", help="run folder written by fastflow train")
    _add_data_args(e, required=False)
    e.set_defaults(format=None)  # None: the run's own (run.json), else mvtec
    e.add_argument("--output", help="metrics JSON file (default: RUN_DIR/metrics.json)")
    e.add_argument("--batch-size", type=_positive(int), default=32, help="images per forward pass")
    e.add_argument("--report", action="store_true",
                   help="also write a self-contained HTML report (curves, galleries) beside the metrics JSON")
    e.add_argument("--misalign", action="store_true",
                   help="also evaluate on the 4x zoomed/rotated/shifted test set (paper Section 8)")
    e.add_argument("--misalign-seed", type=int, default=0, help="seed of the --misalign transforms")
    _add_compute_args(e)
    e.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_invert_parser(sub) -> None:
    iv = sub.add_parser("invert", help="pollute the flow latent in a region and regenerate features (paper 4.5)",
                        description=(
        "Add noise to the flow's latent z in a region of an image, run the flow backwards and save a panel: the "
        "image, the region, the features before and after, and their difference (paper Section 4.5)."),
        epilog="example:\n  fastflow invert runs/bottle image.png --region 40,40,120,120 --output out/")
    iv.add_argument("run_dir", help="run folder written by fastflow train")
    iv.add_argument("image", help="image file")
    iv.add_argument("--region", type=_region, required=True,
                    help="x0,y0,x1,y1 in pixels of IMAGE (x1, y1 exclusive)")
    iv.add_argument("--output", required=True, help="folder for the panel PNG")
    iv.add_argument("--strength", type=float, default=3.0, help="std of the noise added to z")
    iv.add_argument("--level", type=int, default=1,
                    help="feature level of the model, counted from 1 (the finest), as in train --levels")
    iv.add_argument("--channel", type=int, default=None, help="feature channel shown (default: most changed)")
    iv.add_argument("--seed", type=int, default=0, help="seed of the noise")
    _add_compute_args(iv)


def _add_predict_parser(sub) -> None:
    pd = sub.add_parser("predict", help="score new images: heatmaps, overlays, masks and a summary", description=(
        "Score images with a trained run: an anomaly score and decision per image, and heatmap/, overlay/ and mask/ "
        "PNGs with summary.csv and summary.json in the output folder. Unreadable images are reported and skipped; "
        "the exit code is 1 when none could be scored."),
        epilog="example:\n  fastflow predict runs/bottle new_images/ --output predictions/")
    pd.add_argument("run_dir", help="run folder written by fastflow train (or its model.pt)")
    pd.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, folders (recursive) or globs")
    pd.add_argument("--output", required=True, help="folder for heatmap/, overlay/, mask/ and summary.{csv,json}")
    pd.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the run's calibrated)")
    pd.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                    help="onnx: run RUN_DIR/model.onnx (from `fastflow export`) in ONNX Runtime")
    pd.add_argument("--onnx", default=None, help="ONNX model for --runtime onnx (default: RUN_DIR/model.onnx)")
    pd.add_argument("--batch-size", type=_positive(int), default=16, help="images per forward pass")
    pd.add_argument("--overwrite", action="store_true", help="redo images already in OUT_DIR's summary")
    _add_compute_args(pd)
    pd.add_argument("--tile", type=_positive(int), default=None, metavar="PIXELS",
                    help="for frames larger than the training images: score each image in overlapping tiles of "
                         "this many pixels (about the size of a training image), each resized to the model's input "
                         "like a whole image, and stitch the maps; the score is the stitched map's maximum "
                         "(default: the whole image at once)")
    pd.add_argument("--tile-overlap", type=float, default=0.25, help="fraction of a tile shared with its neighbour")
    pd.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_export_parser(sub) -> None:
    ex = sub.add_parser("export", help="export a run to ONNX (score and anomaly map) with a JSON sidecar",
                        description=(
        "Export a trained run to an ONNX graph (image batch -> score, anomaly map) and a JSON sidecar with the "
        "preprocessing and the threshold, then check ONNX Runtime against torch. Needs the export extra: "
        "pip install 'fastflow[export]'."),
        epilog="example:\n  fastflow export runs/bottle --format onnx")
    ex.add_argument("run_dir", help="run folder written by fastflow train")
    ex.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    ex.add_argument("--output", default=None, help="the .onnx file (default: RUN_DIR/model.onnx)")
    ex.add_argument("--opset", type=_positive(int), default=18, help="ONNX opset version")
    ex.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                    help="torch's ONNX exporter (dynamo needs onnxscript)")
    ex.add_argument("--raw-input", action="store_true",
                    help="a graph for deployments: one uint8 RGB image (H, W, 3) of any size in, with the resize "
                         "(Pillow's antialiased bilinear) and normalisation inside; written to RUN_DIR/model_raw.onnx "
                         "unless --output is given")
    _add_compute_args(ex, precision=False)
    ex.add_argument("--quantize", choices=["int8"], default=None,
                    help="int8: ONNX Runtime static quantisation for the CPU, calibrated on --calibration "
                         "(default output RUN_DIR/model-int8.onnx)")
    ex.add_argument("--calibration", default=None, metavar="DIR",
                    help="folder of normal images for --quantize (e.g. the category's train/good)")
    ex.add_argument("--calibration-images", type=_positive(int), default=64,
                    help="at most this many calibration images, evenly spaced (default 64)")
    ex.add_argument("--quantize-scope", choices=["deep", "all", "backbone"], default="deep",
                    help="convolutions made int8: deep (default: all but the finest feature level's, which stay "
                         "float32 for accuracy), all, or the backbone's only")
    ex.add_argument("--calibration-method", choices=["minmax", "percentile", "entropy"], default="minmax",
                    help="how activation ranges are set from the calibration images (default minmax)")


def _add_presets_parser(sub) -> None:
    pr = sub.add_parser("presets", help="list the model presets", description=(
        "The model presets (fastflow train --backbone NAME): backbone, input size, feature levels, flow size, "
        "trainable parameters, training epochs and batch, and whether the backbone weights ship with the package "
        "(offline) or are downloaded."))
    pr.add_argument("--json", action="store_true", help="machine-readable output")


def _add_demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="train and evaluate on a synthetic set: no data, no network", description=(
        "Make a small synthetic texture dataset, train on it and evaluate: a check that the installation works, "
        "with no data and no network."))
    d.add_argument("--output", default="demo-output", help="folder for the dataset, the run and the metrics")
    d.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's own)")
    _add_compute_args(d)
    d.add_argument("--quiet", action="store_true", help="no progress bar")


DESCRIPTION = "fastflow: unsupervised anomaly detection and localisation with 2D normalising flows (FastFlow)."
EPILOG = """\
the usual way:
  fastflow train    --data data/mvtec_ad --category bottle --output runs/bottle
  fastflow evaluate runs/bottle --report
  fastflow predict  runs/bottle new_images/ --output predictions/
  fastflow export   runs/bottle --format onnx

fastflow COMMAND --help describes each command. Every command also takes --config FILE (its options
from a TOML or YAML file; the command line wins) and --log-file FILE (what it prints, appended to FILE).
A user mistake (missing path, bad option, unreadable file, unusable checkpoint) ends with one line on
stderr and exit code 2, never a traceback."""


def _add_serve_parser(sub) -> None:
    sv = sub.add_parser("serve", help="serve a run over HTTP: a JSON API with batching and a web page (needs "
                                      "the serve extra)", description=(
        "Serve a trained run over HTTP: POST /predict scores images (JSON, or one PNG picture), GET /health and "
        "GET /info describe the server and the run, /docs documents the API, and / is a web page where a person "
        "can drop images and see each one's overlay, score and decision. Requests from concurrent clients are "
        "scored together in batches. Needs the serve extra: pip install 'fastflow[serve]'."),
        epilog="example:\n  fastflow serve runs/bottle --port 8000")
    sv.add_argument("run_dir", help="run folder written by fastflow train (or its model.pt)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                                                        "only; 0.0.0.0 for every interface)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    sv.add_argument("--max-batch", type=_positive(int), default=16,
                    help="most images from concurrent requests run as one batch (default 16)")
    sv.add_argument("--batch-window-ms", type=float, default=10.0,
                    help="how long the first waiting image waits for others to join its batch (default 10)")
    sv.add_argument("--max-upload-mb", type=_positive(float), default=32.0,
                    help="largest request body; larger uploads get 413 (default 32)")
    sv.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the run's calibrated)")
    sv.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                    help="onnx: serve RUN_DIR/model.onnx (from `fastflow export`; int8 models too)")
    sv.add_argument("--onnx", default=None, help="ONNX model for --runtime onnx (default: RUN_DIR/model.onnx)")
    _add_compute_args(sv)


def _version() -> str:
    from . import __version__

    return f"fastflow {__version__}"


def _configs(args, name: str | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The preset ``name`` (default: ``--backbone``, else ``DEFAULT_PRESET``) with every option the user gave
    applied to it, through the same ``from_preset`` as the Python API (config.py)."""
    name = name or args.backbone or DEFAULT_PRESET
    given = {"input_size": args.input_size, "flow_steps": args.flow_steps, "hidden_ratio": args.hidden_ratio,
             "kernels": args.kernels, "anomaly_map": args.anomaly_map, "smoothing_sigma": args.smoothing_sigma,
             "levels": args.levels, "norm_affine": False if args.no_norm_affine else None}
    model = {k: v for k, v in given.items() if v is not None}
    roles = {"map_levels": args.map_levels, "score_levels": args.score_levels, "map_weights": args.map_weights}
    # other levels: every level maps and scores (the preset's roles reset), unless roles are given too
    model.update(roles if "levels" in model else {k: v for k, v in roles.items() if v is not None})
    if "levels" not in model and any(v is not None for v in roles.values()):  # roles name levels: name them all
        preset = ModelConfig.from_preset(name)
        if preset.levels is None:  # the backbone's registered levels (lite presets: 1, 2, 3)
            from .backbones import get_spec

            model["levels"] = tuple(get_spec(preset.backbone).indices)
    if args.autocontrast is not None:  # a cut-off, or "off" (None in the config)
        model["autocontrast"] = None if args.autocontrast == "off" else args.autocontrast
    if args.equalize:  # replaces a preset's stretch; with an explicit --autocontrast CUTOFF, ModelConfig refuses both
        explicit = args.autocontrast not in (None, "off")
        model.update(equalize=True, autocontrast=model.get("autocontrast") if explicit else None)
    given = {"epochs": args.epochs, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
             "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "feature_noise": args.feature_noise,
             "val_fraction": args.val_fraction, "val_min": args.val_min, "false_alarm_rate": args.false_alarm_rate,
             "seed": args.seed, "keep_epoch": args.keep_epoch}
    train = {k: v for k, v in given.items() if v is not None}
    train.update(augment=args.augment, cache_features=not args.no_cache)
    if args.score_levels is not None:  # a named score is used as given (no TrainConfig.choose_score)
        train["choose_score"] = False
    if args.choose_map is not None:
        train["choose_map"] = args.choose_map
    if args.border_correction is not None:
        train["border_correction"] = args.border_correction
    if args.map_levels is not None or args.map_weights is not None:  # a named map is used as given (no choose_map)
        train["choose_map"] = False
    return ModelConfig.from_preset(name, **model), TrainConfig.from_preset(name, **train)


def cmd_train(args) -> int:
    from .distributed import init_from_env, shutdown

    dist = init_from_env(device=args.device)  # SINGLE unless started by torchrun with several processes
    try:
        rc = _train(args, dist)
        dist.barrier()  # no rank leaves the group while another may still be in a collective
        return rc
    finally:
        shutdown()


def _train(args, dist) -> int:
    from .auto import CANDIDATES
    from .distributed import SINGLE

    device, precision = _compute(args) if dist.world == 1 else (dist.device, args.precision)
    if args.resume:
        return _train_resume(args, dist, device, precision)
    _folder_defaults(args)
    if not args.data or not args.category or not args.output:
        raise ValueError("train needs --data, --category and --output (or --resume RUN_DIR); the folder format "
                         "needs only --normal-dir and --output")
    auto = args.backbone in (None, "auto")
    configs = _configs(args, CANDIDATES[0] if auto else None)
    categories = _categories(args)
    opts = _data_options(args)
    _clear_run_dirs([args.output if len(categories) == 1 else os.path.join(args.output, c) for c in categories],
                    args.overwrite, dist)
    mine, cat_dist = categories, dist  # each category sharded over all ranks, one after the other ...
    if dist.world > 1 and len(categories) >= dist.world:  # ... or whole categories round-robin over ranks
        mine, cat_dist = dist.owned(categories), SINGLE
    rows = {}
    for cat in mine:
        run_dir = args.output if len(categories) == 1 else os.path.join(args.output, cat)
        row = _train_category(args, cat, run_dir, opts, configs, auto, dist, cat_dist, device, precision)
        if row is not None:
            rows[cat] = row
    gathered = {c: r for part in dist.gather_objects(rows) for c, r in part.items()}  # rank 0 has them all
    rows = {c: gathered[c] for c in categories}
    if dist.is_main and (args.evaluate or len(categories) > 1):
        _print_summary(rows, args.output if len(categories) > 1 else None, args.evaluate)
    return 0


def _train_resume(args, dist, device, precision) -> int:
    """train --resume RUN_DIR: continue (or extend) the run with the configuration its run.json records."""
    from .data import load_samples
    from .train import train

    _check_resume_options(args)
    path = _run_file(args.resume)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --resume takes a run folder written by "
                                f"fastflow train --output RUN_DIR")
    try:
        with open(path) as f:
            saved = json.load(f)
        model_cfg = from_dict(ModelConfig, saved["model_config"])
        train_cfg = from_dict(TrainConfig, saved["train_config"])
        data = saved["data"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is corrupt or from another version ({type(e).__name__}: {e}); "
                         f"start a new run with --output") from e
    train_cfg = _extended(args, model_cfg, train_cfg, path)
    if train_cfg is None:
        return 0
    samples = load_samples(data["format"], data["root"], data["category"], "train", **data["options"])
    res = train(model_cfg, train_cfg, samples, args.resume, weights=saved["weights"], resume=True,
                progress=not args.quiet, dist=dist, device=device, precision=precision)
    if dist.is_main:
        print(f"resumed and finished {args.resume}: kept {res.kept()}, threshold {res.threshold:.4f}")
    return 0


def _train_category(args, cat, run_dir, opts, configs, auto, dist, cat_dist, device, precision) -> dict | None:
    """Train one category into ``run_dir`` (run.json first, removed again if training fails before its first
    checkpoint); its summary row on the rank that writes it (None on the others)."""
    from .data import DecodedImages, load_samples
    from .train import train

    samples = load_samples(args.format, args.data, cat, "train", **opts)
    decoded = DecodedImages()  # each image read once by the probes (auto) and the training
    say = print if cat_dist.is_main else (lambda *a, **k: None)
    where = f" (rank {dist.rank} of {dist.world})" if cat_dist is not dist else ""
    model_cfg, train_cfg, chosen = _start_run(args, cat, run_dir, opts, configs, auto, samples, dist, cat_dist,
                                              say, device, precision, decoded)
    say(f"[{cat}] training {chosen.get('preset') or args.backbone or model_cfg.backbone} on {len(samples)} "
        f"normal images{where} -> {run_dir}")
    resume = "continued_after_epochs" in chosen.get("auto", {})  # from the chosen probe (auto.choose)
    try:
        res = train(model_cfg, train_cfg, samples, run_dir, weights=args.weights, resume=resume,
                    progress=not args.quiet and dist.is_main, dist=cat_dist, device=device, precision=precision,
                    decoded=decoded)
    except BaseException:  # an error, or Ctrl-C before the first checkpoint: nothing to resume
        if cat_dist.is_main:
            _drop_orphan_run_file(run_dir)
        raise
    say(f"[{cat}] done in {res.train_seconds:.1f} s: kept {res.kept()}, "
        f"val NLL {res.best_val_nll if res.best_val_nll is None else round(res.best_val_nll, 4)} nats/dim, "
        f"threshold {res.threshold:.4f}")
    if not cat_dist.is_main:
        return None
    row = {"train": {"n_images": len(samples), "best_epoch": res.best_epoch, "best_val_nll": res.best_val_nll,
                     "threshold": res.threshold, "seconds": round(res.train_seconds, 2),
                     "ranks": [dist.rank] if cat_dist is not dist else list(range(dist.world))}}
    if args.evaluate:
        row.update(_evaluate_one(run_dir, args.format, args.data, cat, opts, os.path.join(run_dir, "metrics.json"),
                                 32, args.quiet, device=device, precision=precision))
    return row


def _start_run(args, cat, run_dir, opts, configs, auto, samples, dist, cat_dist, say, device, precision,
               decoded) -> tuple:
    """(model config, train config, {preset, auto report} or {}) for one category: the preset chosen by
    ``--backbone auto`` or the one given; the writing rank records them in run_dir/run.json."""
    from .auto import CANDIDATES, choose

    model_cfg, train_cfg = configs
    chosen = {}
    if auto:  # every rank probes the same way (deterministic), rank 0 alone writes
        os.makedirs(run_dir, exist_ok=True)
        name, model_cfg, train_cfg, report = choose([(n, *_configs(args, n)) for n in CANDIDATES], samples,
                                                    run_dir, weights=args.weights, log=say,
                                                    probe_tag=f"{dist.rank}" if cat_dist.world > 1 else "",
                                                    device=device, precision=precision,
                                                    continue_in=run_dir if cat_dist.world == 1 else None,
                                                    decoded=decoded)
        chosen = {"preset": name, "auto": report}
    if cat_dist.is_main:
        os.makedirs(run_dir, exist_ok=True)
        with open(_run_file(run_dir), "w") as f:
            json.dump({"model_config": to_dict(model_cfg), "train_config": to_dict(train_cfg),
                       "weights": args.weights, "data": {"format": args.format, "root": os.path.abspath(args.data),
                                                         "category": cat, "options": opts}, **chosen}, f, indent=1)
    return model_cfg, train_cfg, chosen


def _run_file(run_dir: str) -> str:
    return os.path.join(run_dir, "run.json")


# What fastflow writes into a run folder; `train --overwrite` deletes these (and ONNX exports with their
# sidecars), never other files.
RUN_FILES = ("run.json", "model.pt", "checkpoint.pt", "history.json", "metrics.json", "report.html")


def _run_files(run_dir: str) -> list[str]:
    """The files of an earlier run in ``run_dir`` (names), sorted; [] for a new or empty folder."""
    if not os.path.isdir(run_dir):
        return []
    names = set(os.listdir(run_dir))
    exports = {n for n in names if n.endswith(".onnx")}
    sidecars = {os.path.splitext(n)[0] + ".json" for n in exports} & names
    return sorted((names & set(RUN_FILES)) | exports | sidecars)


def _clear_run_dirs(run_dirs: list[str], overwrite: bool, dist) -> None:
    """train into a folder that holds a run: refused, unless ``overwrite``, which deletes that run's files
    first, so that no export, metrics or report of the old model is left beside the new one."""
    found = {d: files for d in run_dirs if (files := _run_files(d))}
    if found and not overwrite:
        d, files = next(iter(found.items()))
        raise ValueError(f"{d} already holds a run ({', '.join(files)}); pass --overwrite to replace it (its model, "
                         f"exports and metrics are deleted), --resume {d} to continue it, or choose another --output")
    if dist.is_main:
        for d, files in found.items():
            for name in files:
                os.unlink(os.path.join(d, name))
    dist.barrier()


def _drop_orphan_run_file(run_dir: str) -> None:
    """A training that failed before its first checkpoint leaves nothing to resume: remove its run.json
    (and the folder, if train created it and it is now empty)."""
    if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        return  # resumable: keep run.json for --resume
    try:
        os.unlink(_run_file(run_dir))
        os.rmdir(run_dir)
    except OSError:
        pass


# Options --resume accepts: the rest are the run's own, saved in run.json.
RESUME_OPTIONS = ("command", "resume", "epochs", "quiet", "evaluate", "output", "device", "threads", "config",
                  "log_file")


def _check_resume_options(args) -> None:
    """--resume continues a run with the options it was started with: any other option given is refused,
    except --epochs (extends a run) and --output naming the same folder."""
    defaults = vars(_build_parser().parse_args(["train"]))
    given = [k for k, v in vars(args).items() if k not in RESUME_OPTIONS and v != defaults.get(k)]
    if args.output is not None and os.path.abspath(args.output) != os.path.abspath(args.resume):
        given.insert(0, "output")
    if given:
        shown = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"--resume continues {args.resume} with the options it was started with (run.json); "
                         f"remove {shown}, or start a new run with --output (only --epochs may extend a run)")


def _extended(args, model_cfg: ModelConfig, train_cfg: TrainConfig, run_json: str) -> TrainConfig | None:
    """The training config to resume with: ``--epochs N`` extends the run to exactly N epochs (recorded in
    run.json; a step budget no longer applies). None when the run has already finished all its epochs (a
    message says how to extend it)."""
    from .checkpoint import CheckpointError, load_safe
    from .train import checkpoint_matches, planned_epochs

    ckpt_path = os.path.join(args.resume, "checkpoint.pt")
    done = 0
    if os.path.isfile(ckpt_path):
        state = load_safe(ckpt_path)
        if not checkpoint_matches(state, model_cfg, train_cfg):
            raise CheckpointError(f"{ckpt_path}: its config differs from this run's ({run_json}); resume with the "
                                  f"same options, or start a new run folder")
        done = int(state.get("epoch", -1)) + 1
    if args.epochs is not None:
        if args.epochs < done:
            raise ValueError(f"--epochs {args.epochs}: {args.resume} has already run {done} epochs; "
                             f"give more than {done} to extend it")
        train_cfg = replace(train_cfg, epochs=args.epochs, steps=None)
        with open(run_json) as f:
            saved = json.load(f)
        saved["train_config"] = to_dict(train_cfg)
        with open(run_json, "w") as f:
            json.dump(saved, f, indent=1)
        return train_cfg
    model_file = os.path.join(args.resume, "model.pt")
    if os.path.isfile(model_file):  # finished once: is its (possibly extended) length reached?
        n_fit = load_safe(model_file).get("n_fit")
        planned = planned_epochs(train_cfg, int(n_fit)) if n_fit is not None else train_cfg.epochs
        if done >= planned:
            print(f"{args.resume} has finished all its {planned} epochs: nothing to resume; extend it with "
                  f"--resume {args.resume} --epochs N (N > {planned})")
            return None
    return train_cfg


def _evaluate_one(run_dir, fmt, root, category, opts, output, batch_size, quiet, report=False,
                  misalign=False, misalign_seed=0, device="cpu", precision="fp32") -> dict:
    from .data import Preprocess, load_samples
    from .evaluate import evaluate_model, format_table
    from .report import per_defect_type
    from .run import load_run

    model, ckpt = load_run(run_dir)
    samples = load_samples(fmt, root, category, "test", **opts)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    threshold = (ckpt.get("threshold") or {}).get("value")
    metrics, scored = evaluate_model(model, samples, pre, batch_size, threshold, progress=not quiet, device=device,
                                     precision=precision)
    if misalign:
        from .misalign import evaluate_misaligned

        metrics["misaligned"] = evaluate_misaligned(model, samples, pre, batch_size, threshold, misalign_seed,
                                                    progress=not quiet, precision=precision)
        print(f"[{category}] aligned vs non-aligned test set (paper Section 8):")
        print(format_table({"aligned": metrics, "misaligned": metrics["misaligned"]}))
    metrics["category"] = category
    metrics["per_defect_type"] = per_defect_type(scored, [s.defect_type for s in samples], threshold)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(metrics, f, indent=1)
    if report:
        from .data import AnomalyDataset
        from .info import run_info
        from .report import report_path_for, write_report

        path = write_report(report_path_for(output), scored, metrics, AnomalyDataset(samples, pre, cache=False),
                            pre.mean, pre.std, threshold, title=f"FastFlow: {category} ({run_dir})",
                            run={**run_info(run_dir), "test_data": {"format": fmt, "root": root, "category": category,
                                                                    "options": opts}},
                            defect_types=[s.defect_type for s in samples])
        print(f"[{category}] report -> {path}")
    return metrics


def _print_summary(rows: dict, folder: str | None, metrics: bool = True) -> None:
    from .evaluate import format_table, mean_row

    trained = {c: r["train"] for c, r in rows.items() if "train" in r}
    if trained:  # from fastflow train: one line per category
        print(f"{'category':<16}{'images':>8}{'kept epoch':>12}{'val NLL':>10}{'threshold':>11}{'seconds':>9}  ranks")
        for c, t in trained.items():
            nll = "-" if t["best_val_nll"] is None else f"{t['best_val_nll']:.4f}"
            print(f"{c:<16}{t['n_images']:>8}{t['best_epoch']:>12}{nll:>10}{t['threshold']:>11.4f}"
                  f"{t['seconds']:>9.1f}  {','.join(map(str, t['ranks']))}")
    if metrics and len(rows) > 1:
        rows = {**rows, "mean": mean_row(rows)}
    if metrics:
        print(format_table(rows))
    if folder:
        with open(os.path.join(folder, "summary.json"), "w") as f:
            json.dump(rows, f, indent=1)


def _data_from_run(args) -> None:
    """evaluate: what the user left out of --data, --category, --format (and, for the folder format, its
    folder options) is taken from the run.json that ``fastflow train`` wrote (RUN_DIR/run.json, or
    RUN_DIR/<category>/run.json for a multi-category run)."""
    saved = []
    if os.path.isfile(_run_file(args.run_dir)):
        paths = [_run_file(args.run_dir)]
    elif os.path.isdir(args.run_dir):
        paths = sorted(_run_file(os.path.join(args.run_dir, d)) for d in os.listdir(args.run_dir)
                       if os.path.isfile(_run_file(os.path.join(args.run_dir, d))))
    else:
        paths = []
    for path in paths:
        try:
            with open(path) as f:
                saved.append(json.load(f)["data"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if saved:
        first = saved[0]
        if args.format is None:
            args.format = first["format"]
        if args.data is None and args.format == first["format"]:
            args.data = first["root"]
        if args.category is None and args.format == first["format"]:
            args.category = ",".join(d["category"] for d in saved) if len(saved) > 1 else first["category"]
        options = first.get("options") or {}
        if args.format == "folder" and first["format"] == "folder" and not _data_options(args):
            args.normal_dir = options.get("normal_dirs")
            args.abnormal_dir = options.get("abnormal_dirs")
            for key in ("mask_dir", "mask_suffix", "test_fraction"):
                setattr(args, key, options.get(key))
    if args.format is None:
        args.format = "mvtec"
    _folder_defaults(args)
    if not args.data or not args.category:
        raise ValueError(f"evaluate needs --data and --category: {args.run_dir} has no run.json to take them "
                         f"from (it is written by fastflow train)")


def cmd_evaluate(args) -> int:
    device, precision = _compute(args)
    _data_from_run(args)
    categories = _categories(args)
    opts = _data_options(args)
    rows = {}
    for cat in categories:
        run_dir = args.run_dir if len(categories) == 1 else os.path.join(args.run_dir, cat)
        out = args.output or os.path.join(run_dir, "metrics.json")
        if len(categories) > 1 and args.output:
            out = os.path.join(os.path.dirname(os.path.abspath(args.output)), f"{cat}-metrics.json")
        rows[cat] = _evaluate_one(run_dir, args.format, args.data, cat, opts, out, args.batch_size, args.quiet,
                                  args.report, args.misalign, args.misalign_seed, device, precision)
        print(f"[{cat}] metrics -> {out}")
    _print_summary(rows, args.run_dir if len(categories) > 1 else None)
    return 0


def presets_table() -> list[dict]:
    """Every preset with its shapes and trainable parameter counts (by arithmetic: presets.py)."""
    from .presets import presets_table as table

    return table()


def cmd_presets(args) -> int:
    rows = presets_table()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'preset':<22}{'backbone':<34}{'size':>5}{'levels (C@stride)':>22}{'steps':>6}{'ratio':>6}"
          f"{'kern':>5}{'trainable':>12}  {'training':<11}{'batch':>5}  {'parts':<10}weights")
    for r in rows:
        levels = " ".join(f"{lv['channels']}@{lv['stride']}" for lv in r["levels"])
        length = f"{r['train_steps']} steps" if r.get("train_steps") else f"{r['epochs']} epochs"
        print(f"{r['name']:<22}{r['backbone']:<34}{r['input_size'][0]:>5}{levels:>22}{r['flow_steps']:>6}"
              f"{r['hidden_ratio']:>6}{r['kernels']:>5}{r['params_trainable']:>12,}  {length:<11}"
              f"{r['batch_size']:>5}  {'aligned' if r['aligned'] else 'unaligned':<10}{r['weights']}")
    for r in rows:  # per-level roles (ModelConfig.map_levels / score_levels)
        if r["map_levels"] is not None or r["score_levels"] is not None:
            strides = lambda sub: ", ".join(str(lv["stride"]) for lv in r["levels"] if sub is None or lv["level"] in sub)
            print(f"{r['name']}: the map from stride {strides(r['map_levels'])}, "
                  f"the image score from stride {strides(r['score_levels'] or r['map_levels'])}")
    return 0


def cmd_invert(args) -> int:
    from .invert import invert_image

    device, precision = _compute(args)
    path = invert_image(args.run_dir, args.image, args.region, args.output, args.strength, args.level,
                        args.channel, args.seed, device=device, precision=precision)
    print(f"panel -> {path}")
    return 0


def cmd_predict(args) -> int:
    from .predict import Predictor, collect_inputs, predict_to_folder

    # bad paths fail before the model loads; the output folder's own pictures are never inputs
    inputs = [str(p) for p in collect_inputs(args.inputs, exclude=args.output)]
    predictor = Predictor.from_run(args.run_dir, args.threshold, args.runtime, args.onnx, args.batch_size,
                                   num_threads=args.threads, device=args.device, precision=args.precision)
    if args.tile is not None:
        predictor = predictor.with_tiles(args.tile, args.tile_overlap)
    summary = predict_to_folder(predictor, inputs, args.output, args.batch_size, args.overwrite,
                                progress=not args.quiet)
    c = summary["counts"]
    print(f"{c['ok']} image(s) scored, {c['anomalous']} anomalous, {c['error']} unreadable "
          f"(threshold {summary['threshold']['value']}) -> {os.path.join(args.output, 'summary.csv')}")
    return _report_failures(summary)


def _report_failures(summary: dict, shown: int = 10) -> int:
    """predict: the reason of each unreadable input on stderr (the first ``shown``); exit code 1 when no
    input could be scored at all, so that a script knows nothing was inspected."""
    failed = [r for r in summary["results"] if r["status"] == "error"]
    for r in failed[:shown]:
        print(f"fastflow predict: {r['error']}", file=sys.stderr)
    if len(failed) > shown:
        print(f"fastflow predict: ... and {len(failed) - shown} more unreadable image(s) (see summary.csv)",
              file=sys.stderr)
    if failed and not summary["counts"]["ok"]:
        print(f"fastflow predict: error: none of the {len(failed)} input image(s) could be read; nothing was "
              f"scored", file=sys.stderr)
        return 1
    return 0


def cmd_export(args) -> int:
    if args.quantize or args.calibration:
        return _export_int8(args)
    from .export import export_onnx
    from .run import sidecar_path

    if args.raw_input:
        from .raw_input import export_raw_onnx

        meta = export_raw_onnx(args.run_dir, args.output, args.opset)
        out = args.output or os.path.join(args.run_dir, "model_raw.onnx")
        print(f"ONNX model (uint8 image of any size in) -> {out} (sidecar {sidecar_path(out)}); its scores match "
              f"Predictor's to {meta['parity']['max_rel_diff_score']:.1e} of their value")
        return 0

    device, _ = _compute(args)
    meta = export_onnx(args.run_dir, args.output, args.opset, args.exporter, device=device)
    out = args.output or os.path.join(args.run_dir, "model.onnx")
    par = meta["parity"]
    print(f"ONNX model -> {out} (sidecar {sidecar_path(out)}); ONNX Runtime matches torch to "
          f"{max(par['max_abs_diff_score'], par['max_abs_diff_map']):.1e} "
          f"({par['max_rel_diff_map']:.1e} of the map's largest value, on random test images)")
    return 0


def _add_calibrate_parser(sub) -> None:
    c = sub.add_parser("calibrate", help="set a run's decision threshold again from more good images",
                       description=(
        "Score a folder of good (normal) images with a trained run and set its decision threshold at the "
        "requested false-alarm rate, without retraining: model.pt and the sidecar of an ONNX export beside it "
        "are updated, the previous threshold is kept in the threshold's 'previous'. A rate r needs at least 1/r "
        "images (100 for 1%)."),
        epilog="example:\n  fastflow calibrate runs/bottle --normal-dir more_good_images/ --false-alarm-rate 0.01")
    c.add_argument("run_dir", help="run folder written by fastflow train (or its model.pt)")
    c.add_argument("--normal-dir", action="append", required=True, metavar="DIR",
                   help="good images: a folder (recursive), a file or a glob (repeatable)")
    c.add_argument("--false-alarm-rate", type=float, default=None,
                   help="share of good images allowed above the threshold (default: the run's, 0.01)")
    c.add_argument("--batch-size", type=_positive(int), default=16, help="images per forward pass")
    c.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_info_parser(sub) -> None:
    i = sub.add_parser("info", help="what a run folder holds: configuration, threshold, metrics, files",
                       description=(
        "Show a trained run: its configuration, the data it was trained on, the threshold and how it was "
        "calibrated, training and test metrics, the fastflow version that wrote it, and its files."),
        epilog="example:\n  fastflow info runs/bottle")
    i.add_argument("run_dir", help="run folder written by fastflow train (or its model.pt)")
    i.add_argument("--json", action="store_true", help="machine-readable output")


def _add_benchmark_parser(sub) -> None:
    b = sub.add_parser("benchmark", help="latency and throughput of a run on this machine (torch and ONNX)",
                       description=(
        "Time a trained run on this machine: the median and 90th-percentile latency of one batch and the "
        "throughput, for the network alone and end to end (preprocessing, network, map resized to the image), in "
        "torch and, when RUN_DIR/model.onnx (fastflow export) and onnxruntime are there, in ONNX Runtime. Images "
        "are synthetic at the run's input size unless --images is given; decoding files is not timed."),
        epilog="example:\n  fastflow benchmark runs/bottle --batch-size 8 --iterations 100 --json bench.json")
    b.add_argument("run_dir", help="run folder written by fastflow train (or its model.pt)")
    b.add_argument("--batch-size", type=_positive(int), default=1, help="images per forward pass")
    b.add_argument("--iterations", type=_positive(int), default=50, help="timed repetitions per measurement")
    b.add_argument("--warmup", type=int, default=5, help="untimed repetitions first")
    b.add_argument("--runtime", choices=["all", "torch", "onnx"], default="all",
                   help="all: torch, and ONNX Runtime where the export is there; torch or onnx: that one only")
    b.add_argument("--onnx", default=None, help="ONNX model to time (default: RUN_DIR/model.onnx)")
    b.add_argument("--images", default=None, metavar="DIR",
                   help="time on the first --batch-size images of this folder, at their own size "
                        "(default: synthetic images at the run's input size)")
    b.add_argument("--json", default=None, metavar="FILE", help="also write the measurements to this JSON file")
    _add_compute_args(b)


def cmd_benchmark(args) -> int:
    from .benchmark import format_benchmark, measure

    device, precision = _compute(args)
    result = measure(args.run_dir, args.batch_size, args.iterations, args.warmup, args.runtime, device, precision,
                     args.threads, args.images, args.onnx)
    print(format_benchmark(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"measurements -> {args.json}")
    return 0


def cmd_info(args) -> int:
    from .info import format_info, run_info

    info = run_info(args.run_dir)
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate_run

    new = calibrate_run(args.run_dir, args.normal_dir, args.false_alarm_rate, args.batch_size,
                        progress=not args.quiet)
    old = new["previous"].get("value")
    shown_old = "none" if old is None or not math.isfinite(old) else f"{old:.4f}"
    updated = ", ".join(["model.pt", *[os.path.basename(p) for p in new.get("sidecars", [])]])
    print(f"threshold {shown_old} -> {new['value']:.4f} (false-alarm rate {new['false_alarm_rate']:g} on "
          f"{new['n_val']} good images; median score {new['val_median']:.4f}); updated {updated} in {args.run_dir}")
    if new.get("warning"):
        print(f"fastflow calibrate: warning: {new['warning'].replace('RUN_DIR', args.run_dir)}", file=sys.stderr)
    return 0


def _export_int8(args) -> int:
    from .export import sidecar_path
    from .quantize import export_int8

    if not args.quantize or not args.calibration:
        raise ValueError("--quantize int8 and --calibration DIR go together: give both (DIR: a folder of normal "
                         "images, e.g. the category's train/good)")
    meta = export_int8(args.run_dir, args.calibration, args.output, args.calibration_images, args.quantize_scope,
                       method=args.calibration_method, opset=args.opset, exporter=args.exporter)
    out = args.output or os.path.join(args.run_dir, meta["onnx_file"])
    q = meta["quantization"]
    agree = q["vs_float32_on_calibration_images"]
    corr = "n/a" if agree["score_pearson"] is None else f"{agree['score_pearson']:.4f}"
    print(f"int8 ONNX model -> {out} (sidecar {sidecar_path(out)}); {q['quantized']}; calibrated on "
          f"{q['calibration']['images']} image(s); vs float32 on them: score correlation {corr}, largest map "
          f"difference {agree['max_map_diff_over_map_range']:.1%} of the map's range")
    return 0


def cmd_serve(args) -> int:
    try:
        from .serve import serve_run
    except ImportError as e:  # the optional extra is not installed: one line naming it
        raise ValueError(str(e)) from None
    if args.batch_window_ms < 0:
        raise ValueError(f"--batch-window-ms must be >= 0, got {args.batch_window_ms}")
    device, precision = _compute(args)
    serve_run(args.run_dir, args.host, args.port, args.max_batch, args.batch_window_ms, args.max_upload_mb,
              args.runtime, args.onnx, args.threshold, device=device, precision=precision, num_threads=args.threads)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    device, precision = _compute(args)
    run_demo(args.output, epochs=args.epochs, progress=not args.quiet, device=device, precision=precision)
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "invert": cmd_invert, "presets": cmd_presets,
            "demo": cmd_demo, "predict": cmd_predict, "export": cmd_export, "calibrate": cmd_calibrate,
            "info": cmd_info, "serve": cmd_serve, "benchmark": cmd_benchmark}


def _user_errors() -> tuple[type[BaseException], ...]:
    from .backbones import BackboneError
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .export import ExportError
    from .train import TrainingError

    return (DatasetError, BackboneError, CheckpointError, TrainingError, ExportError, FileNotFoundError,
            NotADirectoryError, PermissionError)


def _is_user_error(e: BaseException) -> bool:
    """Errors about what the user gave (reported in one line): fastflow's own error classes and file errors,
    and a ValueError raised by fastflow's own code (its messages say what was received and what to do). A
    ValueError raised inside a library (torch, NumPy, ...) is an internal error: it keeps its traceback."""
    if isinstance(e, _user_errors()):
        return True
    if not isinstance(e, ValueError):
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    package = os.path.dirname(os.path.abspath(__file__))
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(package + os.sep)


def main(argv: list[str] | None = None) -> int:
    """The ``fastflow`` command. A user error is one line on stderr (exit 2); ``FASTFLOW_DEBUG=1`` in the
    environment prints its traceback too. Internal errors are raised with their traceback."""
    parser = _build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        argv = _with_config_file(parser, argv)
    except ValueError as e:
        print(f"fastflow {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    from .log_file import command_output

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(command_output(getattr(args, "log_file", None)))
        except OSError as e:
            print(f"fastflow {args.command}: error: --log-file {args.log_file}: {e.strerror or e}", file=sys.stderr)
            return 2
        return _run(args)


def _run(args) -> int:
    """Run the parsed command; user errors become one line on stderr (see ``main``)."""
    try:
        if hasattr(args, "threads"):
            from .device import set_threads

            # the count in use (ONNX Runtime sessions get it too); with none given it follows the load (device.py)
            args.threads = set_threads(args.threads, adaptive=True)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"fastflow {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (`fastflow presets | head`)
        # Point stdout at /dev/null so that the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what a shell tool killed by a broken pipe reports
    except Exception as e:
        if not _is_user_error(e):
            raise
        if os.environ.get("FASTFLOW_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"fastflow {args.command}: error: {e}", file=sys.stderr)
        return 2


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _with_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with the options of its ``--config FILE`` (config_file.py) put before the command line's own,
    so that those win."""
    from .config_file import config_argv, config_path, read_options

    verbs = _subparsers(parser)
    if not argv or argv[0] not in verbs:
        return argv
    path = config_path(argv[1:])
    if path is None:
        return argv
    tokens = config_argv(verbs[argv[0]], argv[0], list(verbs), read_options(path), argv[1:], path)
    return [argv[0], *tokens, *argv[1:]]


def _add_run_file_args(p: argparse.ArgumentParser) -> None:
    """--config and --log-file, which every command has."""
    g = p.add_argument_group("files")
    g.add_argument("--config", metavar="FILE",
                   help="read options from a TOML or YAML file (keys: the long option names, e.g. batch-size = 8; "
                        "a [COMMAND] table for one command); options on the command line win")
    g.add_argument("--log-file", metavar="FILE",
                   help="also append what the command prints to FILE (progress bars as one line each, not every "
                        "redraw)")

if __name__ == "__main__":
    sys.exit(main())
