"""``cavga train``'s short help, --help-advanced, --config FILE, and what every choice list says."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from cavga import cli, cli_options
from cavga.cli import build_parser, main, parse_args
from cavga.cli_options import CHOICES, config_fields, config_options, read_config_file, train_options
from cavga.config import SCORES, LossWeights, ModelConfig, TrainConfig, to_dict
from cavga.errors import ConfigError

# The options of `cavga train` that are not config fields, as the parser had them before the help was split:
# flag -> (sample arguments, the Namespace attribute, the value they give it).
FIXED_TRAIN_OPTIONS = {
    "--out": (["m"], "out", Path("m")),
    "--run-dir": (["r"], "run_dir", Path("r")),
    "--tensorboard": ([], "tensorboard", True),
    "--resume": (["r"], "resume", Path("r")),
    "--checkpoint-steps": (["7"], "checkpoint_steps", 7),
    "--format": (["video"], "format", "video"),
    "--category": (["bottle"], "category", "bottle"),
    "--normal-class": (["3"], "normal_class", "3"),
    "--split-seed": (["5"], "split_seed", 5),
    "--test-fraction": (["0.3"], "test_fraction", 0.3),
    "--split-by": (["image"], "split_by", "image"),
    "--anomalous-fraction": (["0.05"], "anomalous_fraction", 0.05),
    "--anomalous-count": (["4"], "anomalous_count", 4),
    "--anomalous": (["defects"], "anomalous_dir", Path("defects")),
    "--no-progress": ([], "no_progress", True),
    "--paper-map": ([], "paper_map", True),
}
# The config fields the short help shows (issue 34's list); every other one is advanced.
SHORT_HELP_FIELDS = {"variant", "setting", "image_size", "epochs", "seed", "device"}
# (--no-progress is advanced too, but --resume's help names it)
ADVANCED_FIXED = ("--run-dir", "--tensorboard", "--checkpoint-steps", "--normal-class", "--split-seed",
                  "--test-fraction", "--split-by", "--paper-map")  # fmt: skip


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shows(text: str, option: str) -> bool:
    """Whether ``option`` appears in ``text`` as a whole flag (--w-c is not --w-cga)."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["train", *argv])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def sample(f: dataclasses.Field) -> tuple[list[str], object]:
    """Arguments for a config field's flag and the value they must parse to (not the default)."""
    kind = str(f.type).replace(" | None", "")
    choices = f.metadata.get("choices")
    if kind == "bool":
        return [], True
    if choices:
        value = next(c for c in reversed(choices) if c != f.default)
        return [str(value)], value
    value = {"int": 7, "float": 0.25, "str": "x"}[kind]
    return [str(value)], value


# ------------------------------------------------------------------------------------------------ short help


@pytest.mark.parametrize("columns", [None, "80"])
def test_the_short_help_fits_in_80_lines_and_shows_the_basic_options(capsys, monkeypatch, columns):
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    text = help_text(capsys, "--help")
    assert len(text.splitlines()) <= 80, text
    for option in ("--out", "--category", "--format", "--image-size", "--epochs", "--device", "--seed", "--setting",
                   "--anomalous", "--anomalous-count", "--anomalous-fraction", "--variant", "--resume",
                   "--config", "--help-advanced"):  # fmt: skip
        assert shows(text, option), option
    assert "data" in text and "cavga train --help-advanced" in text  # the pointer to the rest, in the epilog
    for f in config_fields():
        assert shows(text, flag(f.name)) == (f.name in SHORT_HELP_FIELDS), f.name
    for option in ADVANCED_FIXED:
        assert not shows(text, option), option


def test_help_advanced_lists_every_flag_with_its_help(capsys):
    text = help_text(capsys, "--help-advanced")
    for f in config_fields():
        assert shows(text, flag(f.name)), f.name
    for option in FIXED_TRAIN_OPTIONS:
        assert shows(text, option), option
    assert "weight of the complementary guided attention loss" in text  # a field's help comes along


def test_a_new_config_field_gets_an_advanced_flag_without_a_change_in_the_cli(capsys, monkeypatch):
    @dataclasses.dataclass
    class Extra:
        new_knob: float | None = dataclasses.field(default=None, metadata={"help": "a knob added later"})

    fields = [*config_fields(), *dataclasses.fields(Extra)]
    monkeypatch.setattr(cli_options, "config_fields", lambda: fields)
    assert build_parser().parse_args(["train", "d", "--new-knob", "0.5"]).new_knob == 0.5
    assert not shows(help_text(capsys, "--help"), "--new-knob")
    assert shows(help_text(capsys, "--help-advanced"), "--new-knob")


# ------------------------------------------------------------------------------------------------ parsing


def test_every_old_train_flag_still_parses_into_the_same_attribute():
    parser = build_parser()
    cases = dict(FIXED_TRAIN_OPTIONS)
    for f in config_fields():
        args, value = sample(f)
        cases[flag(f.name)] = (args, f.name, value)
    assert len(cases) == len(config_fields()) + len(FIXED_TRAIN_OPTIONS)  # no config field shadows a fixed option
    negated = {f"--no-{flag(f.name)[2:]}" for f in config_fields() if f.type in ("bool", "bool | None")}
    new = {"--help-advanced", "--config"}
    assert {o for a in train_options()._actions for o in a.option_strings} == {*cases, *negated, *new}
    for option, (args, dest, value) in cases.items():
        parsed = parser.parse_args(["train", "data", option, *args])
        assert getattr(parsed, dest) == value, option
        assert parsed.data == Path("data")
    for f in config_fields():  # the unset-means-the-variant's fields take --no-X too
        if f.type == "bool | None":
            assert getattr(parser.parse_args(["train", "d", f"--no-{flag(f.name)[2:]}"]), f.name) is False


def test_format_takes_the_loaders_names_and_removed_flags_are_refused(capsys):
    from cavga.data.loader import FORMATS

    assert cli_options.DATA_FORMATS == FORMATS
    for command in (["train", "d"], ["evaluate", "m", "d", "--out", "o"]):
        for name in FORMATS:
            assert parse_args([*command, "--format", name]).format == name
        for removed in ("folder", "pairs"):
            with pytest.raises(SystemExit):
                parse_args([*command, "--format", removed])
            err = capsys.readouterr().err
            assert f"invalid choice: '{removed}'" in err and all(name in err for name in FORMATS), err
    with pytest.raises(SystemExit):  # --variant names the network; --encoder was a second spelling of it
        parse_args(["train", "d", "--encoder", "resnet18"])
    assert "unrecognized arguments: --encoder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ choices


def _all_actions() -> list[tuple[str, argparse.Action]]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    full = argparse.ArgumentParser()
    cli_options.add_train_options(full, show_advanced=True)
    parsers = {**commands, "train": full}
    return [(name, action) for name, p in parsers.items() for action in p._actions]


def test_every_choice_list_says_what_each_choice_means():
    checked = 0
    for command, action in _all_actions():
        if not action.choices or isinstance(action, argparse._SubParsersAction):
            continue
        checked += 1
        for choice in action.choices:
            # "choice: meaning" on a line of its own, or the choice named in a sentence that says what it is for
            named = re.search(rf"(?<![\w-]){re.escape(str(choice))}(?![\w-])", action.help or "")
            assert named, f"cavga {command} {action.option_strings or action.dest}: {choice!r} is not explained"
    assert checked >= 14


def test_per_choice_descriptions_cover_every_choice_the_config_knows():
    from cavga.engine.maps import ANOMALY_MAPS

    assert set(CHOICES["score"][1]) == set(SCORES)
    assert set(CHOICES["anomaly_map"][1]) == set(ANOMALY_MAPS)
    for f in config_fields():
        if f.metadata.get("choices"):
            assert f.name in CHOICES, f.name
            assert set(map(str, f.metadata["choices"])) == set(CHOICES[f.name][1]), f.name


def test_benchmark_image_size_help_says_what_it_sets(monkeypatch, tmp_path, capsys):
    from cavga import benchmark

    seen = {}

    def run_suite(suite, out, *, budget, **kwargs):
        seen["budget"] = budget
        (tmp_path / "results.md").write_text("table\n")
        return SimpleNamespace(results_md=tmp_path / "results.md", results_json=tmp_path / "r.json", records=[],
                               trained=0)  # fmt: skip

    monkeypatch.setattr(benchmark, "run_suite", run_suite)
    assert main(["benchmark", "mvtec", "--out", str(tmp_path), "--quick", "--image-size", "48"]) == 0
    budget, default = seen["budget"], benchmark.default_budget("mvtec", quick=True)
    assert (budget.image_size_d, budget.image_size_r, budget.image_size_ae) == (48, 48, 48)
    assert budget.image_size_l == default.image_size_l  # CAVGA-L and PaDiM keep theirs, as the help says
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    text = next(a.help for a in commands["benchmark"]._actions if "--image-size" in a.option_strings)
    assert "every model" not in text and "CAVGA-L and PaDiM keep" in text


# ------------------------------------------------------------------------------------------------ --config


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


CONFIG = {"model": {"variant": "D", "latent_channels": 8, "flatten_latent": True},
          "train": {"lr": 0.001, "epochs": 2, "weights": {"w_cga": 0.5}}}  # fmt: skip


def test_config_file_values_fill_the_options(tmp_path):
    config = write(tmp_path / "c.json", CONFIG)
    args = parse_args(["train", "d", "--out", "m", "--config", str(config)])
    options = config_options(args, train_options())
    assert options == {"variant": "D", "latent_channels": 8, "flatten_latent": True, "lr": 0.001, "epochs": 2,
                       "w_cga": 0.5}  # fmt: skip
    assert args.config == config


def test_flags_on_the_command_line_win_over_the_config_file(tmp_path):
    config = write(tmp_path / "c.json", CONFIG)
    argv = ["train", "d", "--config", str(config), "--variant", "R", "--lr", "0.0002", "--no-flatten-latent"]
    args = parse_args(argv)
    assert (args.variant, args.lr, args.flatten_latent, args.latent_channels) == ("R", 0.0002, False, 8)
    # --lr given at the dataclass default is not an option any more: the estimator uses that default
    assert config_options(args, train_options()) == {"variant": "R", "latent_channels": 8, "epochs": 2, "w_cga": 0.5}


def test_train_passes_the_config_file_to_the_estimator(tmp_path, monkeypatch):
    import cavga.api

    seen = {}

    class Recorder:
        is_main_process_ = False  # cmd_train returns after fit without saving, as on a torchrun rank > 0

        def __init__(self, **kwargs):
            seen["init"] = kwargs

        def fit(self, data, **kwargs):
            seen["fit"] = kwargs

    monkeypatch.setattr(cavga.api, "Cavga", Recorder)
    config = write(tmp_path / "c.json", CONFIG)
    argv = ["train", str(tmp_path), "--out", str(tmp_path / "m"), "--config", str(config), "--epochs", "3"]
    assert main(argv) == 0
    init = seen["init"]
    given = (init["variant"], init["latent_channels"], init["lr"], init["w_cga"], init["epochs"])
    assert given == ("D", 8, 0.001, 0.5, 3)  # the file's values, and --epochs over the file's 2
    assert seen["fit"]["command"]["config"] == str(config.resolve())  # run.json records which file it was


def test_a_saved_config_json_is_a_config_file(tmp_path):
    model, train = ModelConfig(variant="D", image_size=32), TrainConfig(epochs=4)
    saved = {"cavga_version": "0", "format_version": 3, "model": to_dict(model), "train": to_dict(train),
             "preprocess": {"image_size": 32}, "calibration": {}, "history": []}  # fmt: skip
    values = read_config_file(write(tmp_path / "config.json", saved))
    assert values == {**to_dict(model), **{k: v for k, v in to_dict(train).items() if k != "weights"},
                      **to_dict(LossWeights())}  # fmt: skip


def test_a_saved_config_json_with_an_old_style_key_is_refused_by_name(tmp_path, capsys):
    saved = {"cavga_version": "0", "model": {**to_dict(ModelConfig(variant="D")), "weakly_supervised": False},
             "train": to_dict(TrainConfig())}  # fmt: skip
    del saved["model"]["setting"]
    config = write(tmp_path / "config.json", saved)
    with pytest.raises(ConfigError, match=r"unknown key 'model.weakly_supervised'"):
        read_config_file(config)
    assert main(["train", "d", "--out", "m", "--config", str(config)]) == 2
    assert "model.weakly_supervised" in capsys.readouterr().err


def test_a_yaml_config_file(tmp_path):
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    assert read_config_file(path) == read_config_file(write(tmp_path / "c.json", CONFIG))


@pytest.mark.parametrize(
    "data, message",
    [
        ({"modle": {}}, r"unknown key 'modle'; did you mean 'model'\?"),
        ({"model": {"latent_chanels": 8}}, r"unknown key 'model.latent_chanels'; did you mean 'latent_channels'\?"),
        ({"model": {"epochs": 3}}, r"unknown key 'model.epochs'; epochs belongs in the train section"),
        ({"train": {"weights": {"w_x": 1.0}}}, r"unknown key 'train.weights.w_x'"),
        ({"train": {"lr": "fast"}}, r"train.lr must be a number, got 'fast'"),
        ({"model": {"variant": "Q"}}, r"model.variant must be one of D, R, L, got 'Q'"),
        ([1, 2], r"a config file holds an object"),
    ],
)
def test_a_bad_config_file_is_named_with_the_bad_key(tmp_path, capsys, data, message):
    config = write(tmp_path / "bad.json", data)
    with pytest.raises(ConfigError, match=re.escape(str(config)) + ": " + message):
        read_config_file(config)
    assert main(["train", "d", "--out", "m", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "Traceback" not in err


def test_config_file_not_json_and_resume_with_config_are_refused(tmp_path, capsys):
    (tmp_path / "c.json").write_text("{model: D}")
    assert main(["train", "d", "--out", "m", "--config", str(tmp_path / "c.json")]) == 2
    assert "c.json: not valid JSON" in capsys.readouterr().err
    config = write(tmp_path / "ok.json", CONFIG)
    assert main(["train", "--resume", str(tmp_path), "--config", str(config)]) == 2
    assert "--resume takes the run's own settings; do not give config" in capsys.readouterr().err


def test_the_cli_module_stays_small():
    assert len(Path(cli.__file__).read_text().splitlines()) < 500
    assert len(Path(cli_options.__file__).read_text().splitlines()) < 500
