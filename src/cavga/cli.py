"""The ``cavga`` command line: a thin shell over :mod:`cavga.api`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cavga._version import __version__
from cavga.cli_options import (
    PAPER_MAP_HELP,
    PARSER_TEXT,
    HelpFormatter,
    add_data_options,
    add_train_options,
    config_options,
    data_kwargs,
    file_defaults,
    train_options,
)
from cavga.config import oneclass_options
from cavga.errors import CavgaError, ConfigError

SUITES_HELP = """the experiment:
  mvtec: Table 3, every category of an MVTec-layout root
  pairs: the same table on image + mask pairs (Magnetic Tile, folders)
  oneclass: Table 7, one class normal (MNIST, Fashion-MNIST, CIFAR-10)
  ablation: Table 8's eight columns (flattened or conv z, L_ae, L_cga)"""
# Budget.image_size_l (CAVGA-L and PaDiM, whose ImageNet trunk needs its own size) is not set by --image-size.
BENCHMARK_IMAGE_SIZE_HELP = (
    "image side of CAVGA-D, CAVGA-R and the autoencoder baselines; CAVGA-L and PaDiM keep the suite's size "
    "(default: each model's size in the suite's budget)"
)


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    # Left unset, each limit takes cavga.serve.ServeOptions' default (the module is imported only to serve).
    p.add_argument("model", type=Path, help="saved model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one, printed at start)")
    p.add_argument("--max-body-mb", type=float, default=None, help="request size limit in MiB (default 20)")
    p.add_argument("--max-pixels", type=int, default=None, help="largest image, width x height (default 25e6)")
    p.add_argument("--queue-size", type=int, default=None, help="images waiting for the model; beyond: 503")
    p.add_argument("--max-batch", type=int, default=None, help="images per forward pass")
    p.add_argument("--batch-wait-ms", type=float, default=None, help="how long to wait to fill a batch")
    p.add_argument("--decode-threads", type=int, default=None)
    p.add_argument("--max-connections", type=int, default=None, help="open connections; beyond: 503")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default min(4, CPUs))")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1 ...")
    levels = "how much the server logs: debug (the most), info, warning (default), error (the least)"
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"), help=levels)


def build_parser(train_defaults: dict | None = None) -> argparse.ArgumentParser:
    """The ``cavga`` parser; ``train_defaults`` (a --config file's values) replace the train options' defaults."""
    parser = argparse.ArgumentParser(
        prog="cavga",
        description="Find anomalies in images and show where they are (CAVGA, ECCV 2020).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cavga {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        # No abbreviations: a flag that is gone (--encoder) must be refused, not read as a longer one it begins.
        return sub.add_parser(name, **{"formatter_class": HelpFormatter, "allow_abbrev": False, **kwargs})

    p = add_command("make-data", help="write the built-in demo dataset (MVTec layout)")
    p.add_argument("out", type=Path, help="folder to write")
    p.add_argument("--seed", type=int, default=0)

    p = add_command("demo", help="generate demo data, train, evaluate and predict, all on the CPU in minutes")
    p.add_argument("--out", type=Path, default=Path("cavga-demo"))
    p.add_argument("--epochs", type=int, default=None, help="training epochs per category (demo default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--categories", nargs="+", default=None, help="demo categories to run (default: all)")
    p.add_argument("--no-progress", action="store_true")

    p = add_command("train", help="train a model on a dataset folder (also under torchrun)", **PARSER_TEXT)
    add_train_options(p)
    if train_defaults:
        p.set_defaults(**train_defaults)

    p = add_command("predict", help="score and localize images with a saved model")
    p.add_argument("model", type=Path)
    p.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=32, help="images read, scored and written at a time")
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume", dest="resume", action="store_true", default=True, help="skip images already in OUT (default)"
    )
    again.add_argument("--overwrite", dest="resume", action="store_false", help="remove OUT's predictions first")
    p.add_argument("--skip-errors", action="store_true", help="exit 0 even if some files could not be read")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = add_command("serve", help="serve a saved model over HTTP (POST /predict, GET /health, GET /model)")
    _add_serve_options(p)

    p = add_command("evaluate", help="metrics of a saved model on a dataset's test split")
    p.add_argument("model", type=Path)
    p.add_argument("data", type=Path)
    p.add_argument("--out", type=Path, required=True)
    add_data_options(p)
    p.add_argument("--no-report", action="store_true", help="write only metrics.json (no overlays, no report)")
    p.add_argument("--paper-map", action="store_true", help=PAPER_MAP_HELP)

    p = add_command("report", help="write the HTML report of an evaluate/predict/demo output folder")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="HTML file to write (default RUN_DIR/report.html)")
    p.add_argument("--title", default=None)
    embed = p.add_mutually_exclusive_group()
    embed.add_argument("--embed", dest="embed", action="store_true", default=None, help="images as data URIs")
    embed.add_argument("--link", dest="embed", action="store_false", help="link the image files beside the page")

    p = add_command("export", help="export a saved model to ONNX or torch.export pt2 (anomaly map in the graph)")
    p.add_argument("model", type=Path)
    p.add_argument(
        "--format",
        choices=("onnx", "pt2"),
        default="onnx",
        metavar="FORMAT",
        help="what to write:\n  onnx: an ONNX graph (default)\n  pt2: a torch.export program (torch.export.load)",
    )
    p.add_argument("--out", type=Path, default=None, help="file to write (default MODEL/model.onnx or model.pt2)")

    p = add_command("benchmark", help="run a suite of the paper's experiments (Tables 3, 6, 7, 8); resumable")
    p.add_argument("suite", choices=("mvtec", "pairs", "oneclass", "ablation"), metavar="SUITE", help=SUITES_HELP)
    p.add_argument("--data", type=Path, default=None, help="dataset root (left out with --quick: tiny generated data)")
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md and the cache")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None, help=BENCHMARK_IMAGE_SIZE_HELP)
    p.add_argument("--categories", nargs="+", default=None, help="categories / classes to run (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--models", nargs="+", default=None, help="models to run (default: the suite's)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--width", type=int, default=None, help="base channel width of every model")
    p.add_argument("--max-train", type=int, default=None, help="seeded cap on training images per category")
    p.add_argument("--max-test", type=int, default=None, help="seeded cap on test images per category")
    p.add_argument(
        "--paper-dataset",
        choices=("mnist", "fashion-mnist", "cifar10"),
        default=None,
        help="oneclass: which of Table 7's columns (mnist, fashion-mnist, cifar10) the results sit beside "
        "(default: guessed from the data folder's name)",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="tiny budget (and data) that runs in seconds")
    p.add_argument("--progress", action="store_true", help="show training progress bars (with --jobs 1)")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="models trained at once, each in its own process with an equal share of the cores (default: one per "
        "core on the CPU, one on a GPU; 1: in this process, in order)",
    )
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line's arguments; a --config file's values fill the options not given on the command line."""
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None) is not None:  # the file's values become the defaults: given flags win
        args = build_parser(file_defaults(args)).parse_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except CavgaError as exc:  # an unreadable or wrong --config file
        print(f"cavga: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    # What a fit trains and calibrates on (cavga.engine.fitting's notes) shows without -v; the per-epoch lines
    # of training stay in the run's train.log.
    logging.getLogger("cavga.api").setLevel(logging.INFO)
    try:
        return COMMANDS[args.command](args)
    except CavgaError as exc:
        print(f"cavga: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cavga: interrupted", file=sys.stderr)
        return 130


def cmd_make_data(args: argparse.Namespace) -> int:
    from cavga.data.synthetic import validate_demo_dataset, write_demo_dataset

    manifest = write_demo_dataset(args.out, seed=args.seed)
    validate_demo_dataset(args.out)
    print(f"wrote the demo dataset to {args.out}: {json.dumps(manifest, default=str)}")
    return 0


_RESUME_OVERRIDES = ("epochs", "device", "no_progress", "verbose", "resume", "command")
_PATH_ARGS = ("data", "out", "run_dir", "anomalous_dir", "config")


def default_run_dir(out: Path) -> Path:
    """``OUT.run`` beside the model directory: ``--out`` is replaced whole when the model is saved, so the run's
    files (written while training) cannot live inside it."""
    out = out.resolve()
    return out.with_name(out.name + ".run")


def _command_args(args: argparse.Namespace) -> dict:
    """The command's own arguments as run.json records them (paths resolved)."""
    saved = {k: v for k, v in vars(args).items() if k not in ("resume", "no_progress", "verbose", "command")}
    for key in _PATH_ARGS:
        if saved.get(key) is not None:
            saved[key] = str(Path(saved[key]).resolve())
    return saved


def cmd_train(args: argparse.Namespace) -> int:
    from cavga.api import Cavga, read_run_file
    from cavga.data.loader import is_oneclass

    parser = train_options()
    start = time.perf_counter()
    progress = not args.no_progress
    if args.resume is not None:
        allowed = set(_RESUME_OVERRIDES)
        given = sorted(k for k, v in vars(args).items() if k not in allowed and v != parser.get_default(k))
        if given:
            raise ConfigError(f"--resume takes the run's own settings; do not give {', '.join(given)}")
        command = read_run_file(args.resume).get("command") or {}
        if command.get("out") is None:
            raise ConfigError(f"{args.resume}: not a run of the cavga train command (its run.json names no --out)")
        epochs = args.epochs if args.epochs != parser.get_default("epochs") else None
        device = args.device if args.device != parser.get_default("device") else None
        detector = Cavga.resume(args.resume, epochs=epochs, device=device, progress=progress)
        out, run_dir = Path(command["out"]), args.resume
    else:
        if args.data is None or args.out is None:
            raise ConfigError("train needs DATA and --out (or --resume RUN_DIR)")
        run_dir = args.run_dir if args.run_dir is not None else default_run_dir(args.out)
        args.run_dir = run_dir
        options = config_options(args, parser)
        if is_oneclass(args.data, args.format):
            options = oneclass_options(options)  # the one-class protocol's measured defaults (README)
        detector = Cavga(
            image_size=options.pop("image_size", args.image_size),
            channels=options.pop("channels", args.channels),
            anomalous_fraction=args.anomalous_fraction,
            anomalous_count=args.anomalous_count,
            anomalous_dir=args.anomalous_dir,
            **options,
        )
        detector.fit(
            args.data,
            progress=progress,
            run_dir=run_dir,
            checkpoint_steps=args.checkpoint_steps,
            tensorboard=args.tensorboard,
            command=_command_args(args),
            paper_map=args.paper_map,
            **data_kwargs(args),
        )
        out = args.out
    # Under torchrun every rank runs this command; only rank 0 writes the model and prints.
    if not detector.is_main_process_:
        return 0
    detector.save(out)
    cfg = detector.model_config
    verb = "trained" if detector.train_config.epochs else "fitted (no training step)"
    print(f"{verb} CAVGA-{cfg.variant}_{cfg.setting} in {time.perf_counter() - start:.1f} s; saved to {out}")
    print(f"run directory (log, checkpoint; --resume it to train longer): {run_dir}")
    if cfg.setting == "w":
        weak = detector.data_info_["weak_labels"]
        where = weak["dir"] if weak["source"] == "dir" else "the test split (left out of every evaluation)"
        print(f"weak labels: {weak['n_anomalous']} anomalous image(s) from {where}")
        if detector.train_config.epochs == 0:  # nothing was trained on them, and the map reads none of them
            print(
                f"the labels change no output: the {cfg.anomaly_map} map scored by {cfg.score} reads neither a "
                "label nor a trained weight (--anomaly-map knn_classifier with --epochs 1 is a map that reads them)"
            )
        else:
            print(f"anomalous training examples: {weak['n_labelled_examples']} labelled (with augmented copies), "
                  f"{weak['n_synthetic']} synthesized")  # fmt: skip
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cavga.predict import predict_folder

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    run = predict_folder(
        args.model,
        args.inputs,
        args.out,
        batch_size=args.batch_size,
        resume=args.resume,
        progress=not args.no_progress,
    )
    if run is None:  # a torchrun process other than rank 0
        return 0
    skipped = f" ({run.n_skipped} already there)" if run.n_skipped else ""
    print(f"wrote predictions for {run.n_written} images{skipped} to {run.predictions}")
    if run.n_failed:
        print(f"cavga: {run.n_failed} file(s) could not be read, one line each in {run.errors}", file=sys.stderr)
        return 0 if args.skip_errors else 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from cavga import serve  # needs only core packages; the server's are the optional extra, checked here

    serve.require_server_packages()  # a ConfigError naming pip install 'cavga[serve]'
    options = {
        "max_pixels": args.max_pixels,
        "queue_size": args.queue_size,
        "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms,
        "decode_threads": args.decode_threads,
        "max_connections": args.max_connections,
        "max_body_bytes": None if args.max_body_mb is None else int(args.max_body_mb * 2**20),
    }
    options = {key: value for key, value in options.items() if value is not None}
    threads = args.threads if args.threads is not None else min(4, os.cpu_count() or 1)
    try:
        serve.serve(
            args.model,
            host=args.host,
            port=args.port,
            threads=threads,
            device=args.device,
            log_level=args.log_level,
            **options,
        )
    except (ValueError, OSError) as exc:  # a bad limit, a port in use
        raise ConfigError(str(exc)) from exc
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cavga.api import load
    from cavga.report.outputs import format_metrics_table

    detector = load(args.model)
    result = detector.evaluate(args.data, paper_map=True if args.paper_map else None, **data_kwargs(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = {"model": result} | ({"paper's map": result["paper_map"]} if "paper_map" in result else {})
    print(format_metrics_table(rows))
    print(f"wrote {args.out / 'metrics.json'}")
    if not args.no_report:
        from cavga.report.html import write_report
        from cavga.report.outputs import write_evaluation

        write_evaluation(detector.last_outputs_, detector.calibration_, args.out)
        print(f"wrote overlays and {args.out / 'predictions.jsonl'}; report: {write_report(args.out)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cavga.report.html import write_report

    print(f"wrote {write_report(args.run_dir, args.out, title=args.title, embed=args.embed)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cavga.export import export

    path = export(args.model, args.out, args.format)
    print(f"wrote {path} ({args.format}): input 'image' (B, C, H, W) in [0, 1]; outputs score, anomaly_map, mask")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cavga.demo import run_demo

    run_demo(
        args.out,
        epochs=args.epochs,
        seed=args.seed,
        categories=args.categories,
        progress=not args.no_progress,
    )
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from cavga import benchmark

    budget = benchmark.default_budget(args.suite, args.quick)
    changes = {k: getattr(args, k) for k in ("epochs", "batch_size", "width", "max_train", "max_test", "device")}
    if args.image_size is not None:
        changes.update(image_size_d=args.image_size, image_size_r=args.image_size, image_size_ae=args.image_size)
    budget = dataclasses.replace(budget, **{k: v for k, v in changes.items() if v is not None})
    run = benchmark.run_suite(
        args.suite,
        args.out,
        data=args.data,
        budget=budget,
        categories=args.categories,
        seeds=args.seeds,
        models=args.models,
        quick=args.quick,
        paper_dataset=args.paper_dataset,
        progress=args.progress,
        command=" ".join(["cavga", *sys.argv[1:]]) if sys.argv[1:2] == ["benchmark"] else None,
        jobs=args.jobs,
    )
    print(run.results_md.read_text())
    cached = len(run.records) - run.trained
    print(f"wrote {run.results_json} and {run.results_md} ({run.trained} trained, {cached} cached)")
    return 0


COMMANDS = {
    "make-data": cmd_make_data,
    "demo": cmd_demo,
    "train": cmd_train,
    "predict": cmd_predict,
    "serve": cmd_serve,
    "evaluate": cmd_evaluate,
    "report": cmd_report,
    "export": cmd_export,
    "benchmark": cmd_benchmark,
}

if __name__ == "__main__":
    sys.exit(main())
