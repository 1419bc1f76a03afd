"""The command line as a shell: choices listed and checked by typer, option groups
shared by train and tune, exit codes from one enum, no policy in cli.py."""

import functools
import re
import types
import typing
from enum import Enum
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import ctedge.cli as cli
from ctedge.cli import app
from ctedge.core import choices
from ctedge.core.errors import CtedgeError, ExitCode
from ctedge.edge import engines

runner = CliRunner()
WIDE = {"TERMINAL_WIDTH": "400", "COLUMNS": "400"}  # help rows unwrapped
COMMAND = typer.main.get_command(app)


def command_of(name: str):
    """typer's click command ``name`` (its module loaded, as `ctedge NAME` does)."""
    return COMMAND.get_command(None, name)


# positional arguments each command needs before its options are checked
ARGS = {"train": ["data"], "tune": ["data"], "audit": ["data"], "evaluate": ["m.keras", "data"],
        "report": ["run"], "predict": ["m.onnx", "x.png"], "bench": [], "demo": [],
        "explain": ["m.keras", "x.png"], "export": [], "serve": ["m.onnx"]}
# every fixed vocabulary each command takes, and its enum
CHOICES = {
    "train": {"--clean": choices.Clean, "--backbone": choices.Backbone},
    "tune": {"--clean": choices.Clean, "--backbone": choices.Backbone, "--algorithm": choices.Algorithm,
             "--objective": choices.Objective, "--role": choices.Role},
    "audit": {},
    "evaluate": {"--split": choices.EvalSplit, "--aggregate": choices.Aggregate, "--runtime": engines.Runtime,
                 "--precision": engines.Precision, "--provider": engines.Provider},
    "report": {"--split": choices.EvalSplit},
    "predict": {"--runtime": engines.Runtime, "--precision": engines.Precision, "--provider": engines.Provider,
                "--aggregate": choices.Aggregate},
    "bench": {"--runtime": engines.BenchRuntime, "--precision": engines.Precision,
              "--provider": engines.Provider, "--split": choices.Split},
    "demo": {"--backbone": choices.Backbone},
    "explain": {},
    "export": {},
    "serve": {"--runtime": engines.Runtime, "--precision": engines.Precision, "--provider": engines.Provider,
              "--log-format": choices.LogFormat},
}


def options(command: str) -> dict:
    """Flag -> typer's option of ``command``."""
    return {name: param for param in command_of(command).params if param.param_type_name == "option"
            for name in (*param.opts, *param.secondary_opts)}


@functools.cache
def hints(command: str) -> dict:
    """The annotations ``command``'s function declares, resolved."""
    return typing.get_type_hints(command_of(command).callback)


def kind(command: str, param):
    """The type the command declares for a parameter (``Optional[X]`` read as X)."""
    hint = hints(command)[param.name]
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


def test_every_command_is_covered():
    assert set(CHOICES) == set(COMMAND.list_commands(None)) == set(ARGS)


def test_a_lookup_reuses_the_built_commands_until_another_module_files_more():
    """Each lookup used to rebuild every loaded command (~75 ms with all loaded, on each
    in-process invoke); a module loaded later still gets its commands found."""
    first = command_of("predict")
    assert command_of("predict") is first
    assert command_of("serve").name == "serve" and command_of("predict").name == "predict"


@pytest.mark.parametrize("command", sorted(CHOICES))
def test_help_lists_the_choices_and_an_example(command):
    result = runner.invoke(app, [command, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and f"ctedge {command} " in result.output
    declared = {name: kind(command, param) for name, param in options(command).items()}
    found = {name: hint for name, hint in declared.items() if isinstance(hint, type) and issubclass(hint, Enum)}
    assert found == CHOICES[command], "a fixed vocabulary that is not a choice (or one not listed here)"
    for name, enum in CHOICES[command].items():
        assert "|".join(enum.values()) in result.output, name


@pytest.mark.parametrize("command,flag", [(c, f) for c, flags in sorted(CHOICES.items()) for f in flags])
def test_a_typo_in_a_choice_exits_2_naming_the_allowed_values(command, flag):
    result = runner.invoke(app, [command, *ARGS[command], flag, "bogus"], env=WIDE)
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert flag in result.output and "bogus" in result.output
    for value in CHOICES[command][flag].values():
        assert f"'{value}'" in result.output, value


TRAIN_ONLY = {"--out", "-o", "--resume",  # tune's project folder is --directory and it always resumes
              # tune always stops early on its objective and keeps each trial's best epoch
              "--early-stopping", "--no-early-stopping", "--checkpoint-best", "--no-checkpoint-best"}


def test_tune_accepts_every_data_split_preprocessing_model_and_training_flag_of_train():
    train, tune = options("train"), options("tune")
    assert set(train) - TRAIN_ONLY <= set(tune), sorted(set(train) - TRAIN_ONLY - set(tune))
    for name in set(train) - TRAIN_ONLY:  # one definition: same type and help
        assert (kind("train", train[name]), train[name].help) == (kind("tune", tune[name]), tune[name].help), name


def test_train_and_tune_write_the_same_settings(monkeypatch, tmp_path):
    """The same flags give train and tune the same data, split, preprocessing
    and model settings (what goes into config.json); tune's head flags set its
    first trial."""
    import ctedge.training.train
    import ctedge.training.tuning

    seen = {}
    monkeypatch.setattr(ctedge.training.train, "train", lambda data, train, model, preprocess, *rest, eager: seen.update(
        train=(data, model, preprocess, train), eager=eager) or {"result": {"epochs_run": 0, "seconds": 0.0,
                                                                           "images_per_s": 0.0}, "splits": {}})
    monkeypatch.setattr(ctedge.training.tuning, "tune", lambda data, model, preprocess, options, space, *rest: seen.update(
        tune=(data, model, preprocess, options, space)) or {"role": "worker", "tuner_id": "-", "trials_run": [], "project": "p"})
    flags = ["--clean", "report", "--positive", "CT_COVID", "--test-fraction", "0.3", "--val-fraction", "0.25",
             "--group-regex", "^(p\\d+)", "--seed", "7", "--image-size", "64", "--window-low", "-900",
             "--window-high", "300", "--rotation", "5", "--shift", "0.05", "--zoom", "0", "--no-flip",
             "--weights", "none", "--backbone", "tiny", "--fine-tune-blocks", "2", "--train-backbone",
             "--batch-size", "8", "--patience", "3", "--epochs", "4", "--units", "64", "--dropout", "0.2",
             "--lr", "1e-4", "--eager"]
    train = runner.invoke(app, ["train", "data", "-o", str(tmp_path / "run"), *flags])
    assert train.exit_code == 0, train.output
    tune = runner.invoke(app, ["tune", "data", "--directory", str(tmp_path / "t"), *flags])
    assert tune.exit_code == 0, tune.output
    data, model, preprocess, train_config = seen["train"]
    tune_data, tune_model, tune_preprocess, tune_options, space = seen["tune"]
    assert tune_data == data and tune_preprocess == preprocess
    assert preprocess.window == (-900, 300) and not preprocess.augment.horizontal_flip and data.clean == "report"
    assert (model.units, model.dropout, train_config.learning_rate) == (64, 0.2, 1e-4)
    assert (space.default_units, space.default_dropout, space.default_lr) == (64, 0.2, 1e-4)  # tune's first trial
    head = {"units": tune_model.units, "dropout": tune_model.dropout}  # searched by tune
    assert tune_model == type(model)(**{**model.to_dict(), **head})
    assert (tune_options.batch_size, tune_options.patience, tune_options.epochs) == (8, 3, 4)
    assert seen["eager"] is tune_options.eager is True  # run eagerly, no graph tracing


def test_library_errors_name_the_parameter_and_the_cli_shows_the_flag(tmp_path):
    error = CtedgeError("must be at least 1, not 0", param="batch_size")
    assert str(error) == "batch_size must be at least 1, not 0"
    assert error.with_name("--batch-size") == "--batch-size must be at least 1, not 0"
    assert cli.flag("learning_rate") == "--lr" and cli.flag("fine_tune_blocks") == "--fine-tune-blocks"
    result = runner.invoke(app, ["bench", "--batch-sizes", "0", "--data", str(tmp_path)])
    assert result.exit_code == 2 and "--batch-sizes must be positive integers" in result.output, result.output
    result = runner.invoke(app, ["bench", "--split-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--split-dir needs data" in result.output, result.output


def test_explain_validates_in_the_library(tmp_path):
    from ctedge.evaluation.explain import explain

    with pytest.raises(CtedgeError, match="^alpha must be between 0 and 1, not 5") as refused:
        explain(tmp_path / "m.keras", [], tmp_path, alpha=5)
    assert refused.value.param == "alpha"
    with pytest.raises(CtedgeError, match="needs the trained .keras model"):
        explain(tmp_path / "m.onnx", [], tmp_path)


def test_readme_lists_every_exit_code():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| `(\w+)` \|", readme, re.M))
    assert rows == {str(code.value): code.name for code in ExitCode}


def test_cli_defaults_are_the_librarys():
    """Where a flag keeps its own default (typer shows it in --help), it is the
    library dataclass's, so the two cannot drift."""
    from dataclasses import MISSING, fields

    from ctedge.core.data import DataOptions
    from ctedge.core.preprocess import PreprocessConfig
    from ctedge.core.runconfig import ModelConfig, TrainConfig
    from ctedge.edge.bench import BenchOptions
    from ctedge.edge.study import StudyOptions
    from ctedge.training.export import ExportOptions
    from ctedge.training.tuning import TuneOptions

    owners = {"train": (DataOptions, PreprocessConfig, ModelConfig, TrainConfig),
              "tune": (DataOptions, PreprocessConfig, ModelConfig, TuneOptions),
              "export": (ExportOptions,), "bench": (BenchOptions,), "predict": (StudyOptions,),
              "evaluate": (StudyOptions,)}
    checked = 0
    for command, classes in owners.items():
        params = {p.name: p for p in command_of(command).params}
        for cls in classes:
            for f in fields(cls):
                if f.name in params and f.default is not MISSING and params[f.name].default is not None:
                    default = params[f.name].default
                    assert (str(default) if isinstance(default, Path) else default) == f.default, (command, f.name)
                    checked += 1
    assert checked > 30


def test_a_table_into_a_pipe_keeps_every_cell_and_columns_still_rules(capsys, monkeypatch):
    """Rich draws into a file or a pipe 80 columns wide, cutting a wide table's cells to "…"
    (`ctedge bench 2> bench.txt` kept no engine's name); ctedge's console draws there at the
    table's own width, and COLUMNS, where set, still decides."""
    from rich.table import Table

    from ctedge.core.progress import console

    table = Table()
    for name in "abcdefghijkl":
        table.add_column(name)
    table.add_row(*["long-cell-text"] * 12)
    monkeypatch.delenv("COLUMNS", raising=False)
    console.print(table)
    drawn = capsys.readouterr().err
    assert drawn.count("long-cell-text") == 12 and "…" not in drawn
    monkeypatch.setenv("COLUMNS", "80")
    console.print(table)
    assert "long-cell-text" not in capsys.readouterr().err
