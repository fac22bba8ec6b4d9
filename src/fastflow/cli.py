"""The command line: ``fastflow <command> ...`` (also ``python -m fastflow``).

    fastflow train    --data ROOT --category NAME [--format mvtec|btad|folder|mtd|cifar10] \\
                      [--backbone efficientnet_lite0] [--epochs N] --output RUN_DIR
    fastflow train    --resume RUN_DIR
    torchrun --nproc_per_node N -m fastflow train ...   (several processes; see distributed.py)
    fastflow evaluate RUN_DIR --data ROOT --category NAME [--output metrics.json] [--report] [--misalign]
    fastflow predict  RUN_DIR IMAGE_OR_FOLDER... --output OUT_DIR [--threshold T] [--runtime torch|onnx]
    fastflow export   RUN_DIR --format onnx [--output model.onnx] [--quantize int8 --calibration DIR]
    fastflow serve    RUN_DIR [--host 127.0.0.1] [--port 8000] [--runtime torch|onnx]   (web page and JSON API)
    fastflow invert   RUN_DIR IMAGE --region x0,y0,x1,y1 --output OUT_DIR [--strength S] [--level L]
    fastflow presets  [--json]
    fastflow demo     [--output DIR]

A user mistake (missing path, bad option, unreadable file, unusable checkpoint) ends with one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

from .config import PRESETS, ModelConfig, TrainConfig, check_levels, from_dict, get_preset, to_dict


# -- shared option groups ---------------------------------------------------------------------
def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required, help="dataset root folder")
    g.add_argument("--category", required=required,
                   help="category name, a comma-separated list, or 'all'")
    g.add_argument("--format", default="mvtec", choices=["mvtec", "btad", "folder", "mtd", "cifar10"],
                   help="dataset layout (default: mvtec)")
    g.add_argument("--normal-dir", action="append", default=None, help="folder format: normal images (repeatable)")
    g.add_argument("--abnormal-dir", action="append", default=None,
                   help="folder format: anomalous images (repeatable)")
    g.add_argument("--mask-dir", default=None, help="folder format: folder of masks (default: beside images)")
    g.add_argument("--mask-suffix", default=None, help="folder format: mask name = image stem + suffix")
    g.add_argument("--test-fraction", type=float, default=None, help="folder format: normals kept for test")


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


def _cutoff(text: str) -> float | str:
    """--autocontrast's value: a percent, or 'off' (overrides a preset that stretches)."""
    if text.strip().lower() in ("off", "none"):
        return "off"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percent like 1 or 'off', got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (subcommand parsers inherit the class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


# -- commands ---------------------------------------------------------------------------------
def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastflow", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on normal images")
    _add_data_args(t, required=False)
    t.add_argument("--output", help="run folder to write (for several categories: one subfolder each)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    t.add_argument("--backbone", default=None, help=f"preset / backbone: {', '.join(PRESETS)}")
    t.add_argument("--weights", default="pretrained",
                   help="backbone weights: pretrained (default), random, or a local .pth state dict")
    t.add_argument("--epochs", type=int, default=None, help="default: the preset's own epoch count")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--grad-clip", type=float, default=None,
                   help="max gradient norm per feature dimension (default 0 = off); e.g. 1 against spikes")
    t.add_argument("--feature-noise", type=float, default=None,
                   help="noise regularisation: Gaussian noise x each level's feature std added to the training "
                        "features (lite presets 0.2, paper presets 0 = off)")
    t.add_argument("--input-size", type=_size, default=None, help="N or H,W (default: the preset's)")
    t.add_argument("--flow-steps", type=int, default=None)
    t.add_argument("--hidden-ratio", type=float, default=None)
    t.add_argument("--kernels", choices=["3-1", "3-3"], default=None)
    t.add_argument("--levels", type=_levels, default=None,
                   help="backbone feature levels, one flow each (CNN: 1=stride 4, 2=stride 8, 3=stride 16, "
                        "4=stride 32)")
    t.add_argument("--no-norm-affine", action="store_true",
                   help="LayerNorm without its learned per-location affine: position-free, and the loss stays a "
                        "proper likelihood; for parts that are not aligned (Magnetic Tile: README)")
    t.add_argument("--anomaly-map", choices=["loglik", "reference"], default=None)
    t.add_argument("--smoothing-sigma", type=float, default=None)
    t.add_argument("--autocontrast", type=_cutoff, nargs="?", const=1.0, default=None, metavar="CUTOFF",
                   help="stretch each image's contrast before resizing, clipping CUTOFF percent of the darkest and "
                        "brightest pixels (default 1 when given; 'off' to switch a preset's off); saved with the "
                        "model's preprocessing. For dark, low-contrast parts (Magnetic Tile: README)")
    t.add_argument("--equalize", action="store_true",
                   help="equalise each image's histogram (per channel) before resizing, instead of a preset's "
                        "--autocontrast; saved with the model's preprocessing")
    t.add_argument("--augment", action="store_true", help="paper Section 6.2 augmentation (flips, rotation)")
    t.add_argument("--no-cache", action="store_true", help="recompute backbone features every epoch")
    t.add_argument("--val-fraction", type=float, default=None)
    t.add_argument("--false-alarm-rate", type=float, default=None,
                   help="threshold calibration on held-out normals (default 0.01)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--evaluate", action="store_true", help="evaluate on the test split after training")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("evaluate", help="metrics of a trained run on a labelled test set")
    e.add_argument("run_dir")
    _add_data_args(e)
    e.add_argument("--output", help="metrics JSON file (default: RUN_DIR/metrics.json)")
    e.add_argument("--batch-size", type=_positive(int), default=32)
    e.add_argument("--report", action="store_true",
                   help="also write a self-contained HTML report (curves, galleries) beside the metrics JSON")
    e.add_argument("--misalign", action="store_true",
                   help="also evaluate on the 4x zoomed/rotated/shifted test set (paper Section 8)")
    e.add_argument("--misalign-seed", type=int, default=0, help="seed of the --misalign transforms")
    e.add_argument("--quiet", action="store_true")

    iv = sub.add_parser("invert", help="pollute the flow latent in a region and regenerate features (paper 4.5)")
    iv.add_argument("run_dir")
    iv.add_argument("image")
    iv.add_argument("--region", type=_region, required=True,
                    help="x0,y0,x1,y1 in pixels of IMAGE (x1, y1 exclusive)")
    iv.add_argument("--output", required=True, help="folder for the panel PNG")
    iv.add_argument("--strength", type=float, default=3.0, help="std of the noise added to z (default 3)")
    iv.add_argument("--level", type=int, default=0, help="feature level (0: the finest)")
    iv.add_argument("--channel", type=int, default=None, help="feature channel shown (default: most changed)")
    iv.add_argument("--seed", type=int, default=0)

    pd = sub.add_parser("predict", help="score new images: heatmaps, overlays, masks and a summary")
    pd.add_argument("run_dir")
    pd.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, folders (recursive) or globs")
    pd.add_argument("--output", required=True, help="folder for heatmap/, overlay/, mask/ and summary.{csv,json}")
    pd.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the run's calibrated)")
    pd.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                    help="onnx: run RUN_DIR/model.onnx (from `fastflow export`) in ONNX Runtime")
    pd.add_argument("--onnx", default=None, help="ONNX model for --runtime onnx (default: RUN_DIR/model.onnx)")
    pd.add_argument("--batch-size", type=_positive(int), default=16)
    pd.add_argument("--overwrite", action="store_true", help="redo images already in OUT_DIR's summary")
    pd.add_argument("--quiet", action="store_true")

    ex = sub.add_parser("export", help="export a run to ONNX (score and anomaly map) with a JSON sidecar")
    ex.add_argument("run_dir")
    ex.add_argument("--format", choices=["onnx"], default="onnx")
    ex.add_argument("--output", default=None, help="the .onnx file (default: RUN_DIR/model.onnx)")
    ex.add_argument("--opset", type=_positive(int), default=18)
    ex.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
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

    _add_serve_parser(sub)

    pr = sub.add_parser("presets", help="list the model presets")
    pr.add_argument("--json", action="store_true", help="machine-readable output")

    d = sub.add_parser("demo", help="train and evaluate on a synthetic set: no data, no network")
    d.add_argument("--output", default="demo-output")
    d.add_argument("--epochs", type=int, default=None)
    d.add_argument("--quiet", action="store_true")
    return parser


def _add_serve_parser(sub) -> None:
    sv = sub.add_parser("serve", help="serve a run over HTTP: a JSON API with batching and a web page (needs "
                                      "the serve extra)")
    sv.add_argument("run_dir")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                                                        "only; 0.0.0.0 for every interface)")
    sv.add_argument("--port", type=int, default=8000)
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


def _version() -> str:
    from . import __version__

    return f"fastflow {__version__}"


def _configs(args) -> tuple[ModelConfig, TrainConfig]:
    preset = get_preset(args.backbone or "efficientnet_lite0")
    m = preset.model
    overrides = {"input_size": args.input_size, "flow_steps": args.flow_steps, "hidden_ratio": args.hidden_ratio,
                 "kernels": args.kernels, "anomaly_map": args.anomaly_map, "smoothing_sigma": args.smoothing_sigma,
                 "levels": args.levels, "norm_affine": False if args.no_norm_affine else None}
    m = replace(m, **{k: v for k, v in overrides.items() if v is not None})
    if args.autocontrast is not None:  # a cut-off, or "off" (None in the config)
        m = replace(m, autocontrast=None if args.autocontrast == "off" else args.autocontrast)
    if args.equalize:  # replaces a preset's stretch; with an explicit --autocontrast CUTOFF, ModelConfig refuses both
        explicit = args.autocontrast not in (None, "off")
        m = replace(m, equalize=True, autocontrast=m.autocontrast if explicit else None)
    t = replace(preset.train, epochs=args.epochs if args.epochs is not None else preset.epochs)
    overrides = {"batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
                 "grad_clip": args.grad_clip, "feature_noise": args.feature_noise, "val_fraction": args.val_fraction,
                 "false_alarm_rate": args.false_alarm_rate, "seed": args.seed}
    t = replace(t, augment=args.augment, cache_features=not args.no_cache,
                **{k: v for k, v in overrides.items() if v is not None})
    return m, t


def cmd_train(args) -> int:
    from .distributed import init_from_env, shutdown

    dist = init_from_env()  # SINGLE unless started by torchrun with several processes
    try:
        rc = _train(args, dist)
        dist.barrier()  # no rank leaves the group while another may still be in a collective
        return rc
    finally:
        shutdown()


def _train(args, dist) -> int:
    from .data import load_samples
    from .distributed import SINGLE
    from .train import train

    if args.resume:
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
        samples = load_samples(data["format"], data["root"], data["category"], "train", **data["options"])
        res = train(model_cfg, train_cfg, samples, args.resume, weights=saved["weights"], resume=True,
                    progress=not args.quiet, dist=dist)
        if dist.is_main:
            print(f"resumed and finished {args.resume}: best epoch {res.best_epoch}, threshold {res.threshold:.4f}")
        return 0
    if not args.data or not args.category or not args.output:
        raise ValueError("train needs --data, --category and --output (or --resume RUN_DIR)")
    model_cfg, train_cfg = _configs(args)
    categories = _categories(args)
    opts = _data_options(args)
    mine, cat_dist = categories, dist  # each category sharded over all ranks, one after the other ...
    if dist.world > 1 and len(categories) >= dist.world:  # ... or whole categories round-robin over ranks
        mine, cat_dist = dist.owned(categories), SINGLE
    rows = {}
    for cat in mine:
        run_dir = args.output if len(categories) == 1 else os.path.join(args.output, cat)
        samples = load_samples(args.format, args.data, cat, "train", **opts)
        say = print if cat_dist.is_main else (lambda *a, **k: None)
        where = f" (rank {dist.rank} of {dist.world})" if cat_dist is not dist else ""
        if cat_dist.is_main:
            os.makedirs(run_dir, exist_ok=True)
            with open(_run_file(run_dir), "w") as f:
                json.dump({"model_config": to_dict(model_cfg), "train_config": to_dict(train_cfg),
                           "weights": args.weights, "data": {"format": args.format, "root": os.path.abspath(args.data),
                                                             "category": cat, "options": opts}}, f, indent=1)
        say(f"[{cat}] training {model_cfg.backbone} on {len(samples)} normal images{where} -> {run_dir}")
        res = train(model_cfg, train_cfg, samples, run_dir, weights=args.weights,
                    progress=not args.quiet and dist.is_main, dist=cat_dist)
        say(f"[{cat}] done in {res.train_seconds:.1f} s: best epoch {res.best_epoch}, "
            f"val NLL {res.best_val_nll if res.best_val_nll is None else round(res.best_val_nll, 4)} nats/dim, "
            f"threshold {res.threshold:.4f}")
        if not cat_dist.is_main:
            continue
        rows[cat] = {"train": {"n_images": len(samples), "best_epoch": res.best_epoch, "best_val_nll": res.best_val_nll,
                               "threshold": res.threshold, "seconds": round(res.train_seconds, 2),
                               "ranks": [dist.rank] if cat_dist is not dist else list(range(dist.world))}}
        if args.evaluate:
            rows[cat].update(_evaluate_one(run_dir, args.format, args.data, cat, opts,
                                           os.path.join(run_dir, "metrics.json"), 32, args.quiet))
    gathered = {c: r for part in dist.gather_objects(rows) for c, r in part.items()}  # rank 0 has them all
    rows = {c: gathered[c] for c in categories}
    if dist.is_main and (args.evaluate or len(categories) > 1):
        _print_summary(rows, args.output if len(categories) > 1 else None, args.evaluate)
    return 0


def _run_file(run_dir: str) -> str:
    return os.path.join(run_dir, "run.json")


def _evaluate_one(run_dir, fmt, root, category, opts, output, batch_size, quiet, report=False,
                  misalign=False, misalign_seed=0) -> dict:
    from .data import Preprocess, load_samples
    from .evaluate import evaluate_model, format_table, load_run

    model, ckpt = load_run(run_dir)
    samples = load_samples(fmt, root, category, "test", **opts)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    threshold = (ckpt.get("threshold") or {}).get("value")
    metrics, scored = evaluate_model(model, samples, pre, batch_size, threshold, progress=not quiet)
    if misalign:
        from .misalign import evaluate_misaligned

        metrics["misaligned"] = evaluate_misaligned(model, samples, pre, batch_size, threshold, misalign_seed,
                                                    progress=not quiet)
        print(f"[{category}] aligned vs non-aligned test set (paper Section 8):")
        print(format_table({"aligned": metrics, "misaligned": metrics["misaligned"]}))
    metrics["category"] = category
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(metrics, f, indent=1)
    if report:
        from .data import AnomalyDataset
        from .report import report_path_for, write_report

        path = write_report(report_path_for(output), scored, metrics, AnomalyDataset(samples, pre, cache=False),
                            pre.mean, pre.std, threshold, title=f"FastFlow: {category} ({run_dir})")
        print(f"[{category}] report -> {path}")
    return metrics


def _print_summary(rows: dict, folder: str | None, metrics: bool = True) -> None:
    from .evaluate import format_table, mean_row

    trained = {c: r["train"] for c, r in rows.items() if "train" in r}
    if trained:  # from fastflow train: one line per category
        print(f"{'category':<16}{'images':>8}{'best epoch':>12}{'val NLL':>10}{'threshold':>11}{'seconds':>9}  ranks")
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


def cmd_evaluate(args) -> int:
    categories = _categories(args)
    opts = _data_options(args)
    rows = {}
    for cat in categories:
        run_dir = args.run_dir if len(categories) == 1 else os.path.join(args.run_dir, cat)
        out = args.output or os.path.join(run_dir, "metrics.json")
        if len(categories) > 1 and args.output:
            out = os.path.join(os.path.dirname(os.path.abspath(args.output)), f"{cat}-metrics.json")
        rows[cat] = _evaluate_one(run_dir, args.format, args.data, cat, opts, out, args.batch_size, args.quiet,
                                  args.report, args.misalign, args.misalign_seed)
        print(f"[{cat}] metrics -> {out}")
    _print_summary(rows, args.run_dir if len(categories) > 1 else None)
    return 0


def presets_table() -> list[dict]:
    """Every preset with its shapes and trainable parameter counts (built with random weights)."""
    from .model import FastFlow

    rows = []
    for p in PRESETS.values():
        model = FastFlow(p.model, weights="random")
        counts = model.parameter_counts()
        rows.append({
            "name": p.name, "backbone": p.model.backbone, "input_size": list(p.model.input_size),
            "levels": [{"channels": c, "stride": s, "shape": list(sh)} for c, s, sh in
                       zip(model.backbone.channels, model.backbone.strides, model.feature_shapes)],
            "flow_steps": p.model.flow_steps, "hidden_ratio": p.model.hidden_ratio, "kernels": p.model.kernels,
            "epochs": p.epochs, "params_flow": counts["flow"], "params_norm": counts["norm"],
            "params_trainable": counts["trainable"], "params_backbone": counts["backbone"],
            "reproduces": p.reproduces,
        })
    return rows


def cmd_presets(args) -> int:
    rows = presets_table()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'preset':<20}{'backbone':<34}{'size':>6}{'levels (C@stride)':>22}{'steps':>6}{'ratio':>6}"
          f"{'kern':>5}{'flow':>12}{'norm':>10}{'trainable':>12}")
    for r in rows:
        levels = " ".join(f"{lv['channels']}@{lv['stride']}" for lv in r["levels"])
        print(f"{r['name']:<20}{r['backbone']:<34}{r['input_size'][0]:>6}{levels:>22}{r['flow_steps']:>6}"
              f"{r['hidden_ratio']:>6}{r['kernels']:>5}{r['params_flow']:>12,}{r['params_norm']:>10,}"
              f"{r['params_trainable']:>12,}")
    return 0


def cmd_invert(args) -> int:
    from .invert import invert_image

    path = invert_image(args.run_dir, args.image, args.region, args.output, args.strength, args.level,
                        args.channel, args.seed)
    print(f"panel -> {path}")
    return 0


def cmd_predict(args) -> int:
    from .predict import Predictor, collect_inputs, predict_to_folder

    inputs = [str(p) for p in collect_inputs(args.inputs)]  # bad paths fail before the model loads
    predictor = Predictor.from_run(args.run_dir, args.threshold, args.runtime, args.onnx, args.batch_size)
    summary = predict_to_folder(predictor, inputs, args.output, args.batch_size, args.overwrite,
                                progress=not args.quiet)
    c = summary["counts"]
    print(f"{c['ok']} image(s) scored, {c['anomalous']} anomalous, {c['error']} unreadable "
          f"(threshold {summary['threshold']['value']}) -> {os.path.join(args.output, 'summary.csv')}")
    return 0


def cmd_export(args) -> int:
    if args.quantize or args.calibration:
        return _export_int8(args)
    from .export import export_onnx, sidecar_path

    meta = export_onnx(args.run_dir, args.output, args.opset, args.exporter)
    out = args.output or os.path.join(args.run_dir, "model.onnx")
    par = meta["parity"]
    print(f"ONNX model -> {out} (sidecar {sidecar_path(out)}); ONNX Runtime matches torch to "
          f"{max(par['max_abs_diff_score'], par['max_abs_diff_map']):.1e} "
          f"({par['max_rel_diff_map']:.1e} of the map's largest value, on random test images)")
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
    serve_run(args.run_dir, args.host, args.port, args.max_batch, args.batch_window_ms, args.max_upload_mb,
              args.runtime, args.onnx, args.threshold)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.output, epochs=args.epochs, progress=not args.quiet)
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "invert": cmd_invert, "presets": cmd_presets,
            "demo": cmd_demo, "predict": cmd_predict, "export": cmd_export, "serve": cmd_serve}


def _user_errors() -> tuple[type[BaseException], ...]:
    from .backbones import BackboneError
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .export import ExportError
    from .train import TrainingError

    return (DatasetError, BackboneError, CheckpointError, TrainingError, ExportError, ValueError, FileNotFoundError,
            NotADirectoryError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except _user_errors() as e:
        print(f"fastflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastflow {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (`fastflow presets | head`)
        # Point stdout at /dev/null so that the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what a shell tool killed by a broken pipe reports


if __name__ == "__main__":
    sys.exit(main())
