"""``--help`` of the ``lightning-amor`` command: every subcommand has one, and every option it lists says what it does.

LightningCLI in subclass mode shows the options of a model or data class with ``--model.help CLASS`` (and
``--data.help CLASS``, ``--model.init_args.amortizer.help CLASS``, ...); those are checked for the shipped classes too.
"""

from __future__ import annotations

import re
import sys

import pytest

from lightning_amor.cli import EXTRA_SUBCOMMANDS, TRAINER_SUBCOMMANDS, main

OPTION = re.compile(r"^ {2}(-{1,2}\w\S*(?: \S+)*?)(?: {2,}(.*))?$")
"""An option entry of argparse's help: two spaces, the option strings, then (maybe on later lines) its help."""

# Classes whose constructor options a recipe sets, shown with `fit --<key>.help CLASS`.
CLASS_HELP = [
    ("model", "lightning_amor.AmortizedModule"),
    ("model", "lightning_amor.apps.vae.VAEModule"),
    ("data", "datamodules.SphereContexts"),
    ("data", "datamodules.DigitsImages"),
    ("data", "datamodules.MNISTImages"),
]
NESTED_HELP = [  # (model class, nested key, class): options of the parts of a model
    ("lightning_amor.AmortizedModule", "amortizer", "lightning_amor.FullyAmortized"),
    ("lightning_amor.AmortizedModule", "amortizer", "lightning_amor.SemiAmortized"),
    ("lightning_amor.AmortizedModule", "amortizer", "lightning_amor.apps.vae.SemiAmortizedVI"),
    ("lightning_amor.AmortizedModule", "objective", "lightning_amor.apps.sphere.SphereObjective"),
    ("lightning_amor.AmortizedModule", "objective", "lightning_amor.apps.vae.ELBOObjective"),
    ("lightning_amor.AmortizedModule", "loss", "lightning_amor.IterateSumLoss"),
    ("lightning_amor.AmortizedModule", "refine", "lightning_amor.apps.vae.SVI"),
    ("lightning_amor.AmortizedModule", "refine", "lightning_amor.solvers.LBFGS"),
    ("lightning_amor.AmortizedModule", "refine", "lightning_amor.solvers.MultiStart"),
]
NET_HELP = ["lightning_amor.MLP", "lightning_amor.LearnedConstant", "lightning_amor.apps.vae.BurgessEncoder"]
UPDATE_HELP = ["lightning_amor.GradientStep", "lightning_amor.AdamStep", "lightning_amor.LearnedUpdate"]
# Options known to lack a description, in files owned elsewhere: document them there, then delete the entry
# (the test fails when such a list is out of date in either direction).
KNOWN_UNDOCUMENTED = {
    "lightning_amor.apps.vae.BurgessEncoder": [
        "--net.latent_dim LATENT_DIM", "--net.channels CHANNELS", "--net.image_size IMAGE_SIZE",
        "--net.hidden HIDDEN",
    ],
}

@pytest.fixture(autouse=True)
def wide_help(tmp_path, monkeypatch):
    """One help entry per option on few lines, run from an empty folder as the console script would."""
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-amor"])
    monkeypatch.setattr(sys, "path", list(sys.path))


def help_text(args: list[str], capsys) -> str:
    """The text that ``lightning-amor ARGS`` prints before it exits with status 0."""
    with pytest.raises(SystemExit) as info:
        main(args)
    out = capsys.readouterr().out
    assert info.value.code in (0, None), f"`lightning-amor {' '.join(args)}` failed: {capsys.readouterr().err}"
    assert out.strip(), f"`lightning-amor {' '.join(args)}` printed nothing"
    return out


def options(text: str) -> dict[str, str]:
    """``{option strings: help text}`` for every option entry of an argparse help text."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = OPTION.match(line)
        if match:
            current = match.group(1)
            entries[current] = (match.group(2) or "").strip()
        elif current is not None and line.startswith(" " * 6) and line.strip():
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def undocumented(text: str) -> list[str]:
    """The options whose help is empty, or only jsonargparse's ``(type: ..., default: ...)`` suffix."""
    return [name for name, description in options(text).items()
            if not re.sub(r"\((required, )?type: .*\)$", "", description).strip()]


def test_top_level_help_lists_every_subcommand(capsys):
    text = help_text(["--help"], capsys)
    for name in [*TRAINER_SUBCOMMANDS, *EXTRA_SUBCOMMANDS]:
        assert re.search(rf"^ {{4}}{name} +\S", text, flags=re.M), f"`lightning-amor --help` does not list {name}"
    assert "lightning-amor recipes" in text


def test_no_arguments_names_every_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "{fit,validate,test,predict,recipes,solve,export,evaluate}" in err, err


@pytest.mark.parametrize("subcommand", list(TRAINER_SUBCOMMANDS))
def test_trainer_subcommand_help_explains_every_option(subcommand, capsys):
    text = help_text([subcommand, "--help"], capsys)
    found = options(text)
    for expected in ("--trainer.max_steps", "--ckpt_path", "--model.help", "--data.help", "--preemption.signals"):
        assert any(expected in name.split(", ")[0].split(" ")[0] for name in found), f"{expected} not in {subcommand}"
    assert undocumented(text) == [], f"`lightning-amor {subcommand} --help`: options without a description"


@pytest.mark.parametrize(("key", "class_path"), CLASS_HELP)
def test_class_help_explains_every_option(key, class_path, capsys):
    text = help_text(["fit", f"--{key}.help", class_path], capsys)
    assert len(options(text)) >= 3, text
    assert undocumented(text) == [], f"`fit --{key}.help {class_path}`: options without a description"


@pytest.mark.parametrize(("model", "key", "class_path"), NESTED_HELP)
def test_nested_class_help_explains_every_option(model, key, class_path, capsys):
    text = help_text(["fit", "--model", model, f"--model.init_args.{key}.help", class_path], capsys)
    assert options(text), text
    assert undocumented(text) == [], f"`--model.init_args.{key}.help {class_path}`: options without a description"


@pytest.mark.parametrize("class_path", NET_HELP)
def test_network_help_explains_every_option(class_path, capsys):
    args = ["fit", "--model", "lightning_amor.AmortizedModule", "--model.init_args.amortizer",
            "lightning_amor.FullyAmortized", "--model.init_args.amortizer.init_args.net.help", class_path]
    text = help_text(args, capsys)
    assert undocumented(text) == KNOWN_UNDOCUMENTED.get(class_path, []), f"{class_path}: options without a description"


@pytest.mark.parametrize("class_path", UPDATE_HELP)
def test_update_rule_help_explains_every_option(class_path, capsys):
    args = ["fit", "--model", "lightning_amor.AmortizedModule", "--model.init_args.amortizer",
            "lightning_amor.SemiAmortized", "--model.init_args.amortizer.init_args.update.help", class_path]
    text = help_text(args, capsys)
    assert undocumented(text) == [], f"{class_path}: options without a description"


@pytest.mark.parametrize("subcommand", list(EXTRA_SUBCOMMANDS))
def test_extra_subcommand_help_explains_every_option(subcommand, capsys):
    text = help_text([subcommand, "--help"], capsys)
    assert f"lightning-amor {subcommand}" in text
    found = options(text)
    assert found, text
    assert undocumented(text) == [], f"`lightning-amor {subcommand} --help`: options without a description"


def test_the_help_check_sees_undocumented_options():
    sample = """options:
  -h, --help            Show this help message and exit.
  --documented X        what it does. (type: int, default: 1)
  --bare BARE           (type: int, default: 2)
  --very.long.option.name VALUE
                        (required, type: <class 'Objective'>, known subclasses: a.B,
                        c.D)
  --wrapped W           starts here
                        and goes on. (type: str, default: x)
"""
    assert undocumented(sample) == ["--bare BARE", "--very.long.option.name VALUE"]
    assert set(options(sample)) == {"-h, --help", "--documented X", "--bare BARE", "--very.long.option.name VALUE",
                                    "--wrapped W"}


def test_an_unknown_subcommand_is_named_with_the_choices(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fitt", "--config", "x.yaml"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown subcommand 'fitt'" in err and "{fit,validate,test,predict,recipes,solve,export,evaluate}" in err
