"""Run settings (engine/config.py): the flag groups of ``run --help`` and ``--data-dir``."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from engine.cli import build_parser, main
from engine.config import GROUPS, RunConfig, add_arguments, resolve


def test_every_setting_belongs_to_one_of_the_help_groups():
    missing = [f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("group") not in GROUPS]
    assert not missing, f"give these RunConfig fields a group= from engine.config.GROUPS: {missing}"
    assert all(f.metadata.get("help") for f in dataclasses.fields(RunConfig))


def test_run_help_lists_each_flag_under_its_group(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    sections = {}
    for title in GROUPS:
        assert f"\n{title}:\n" in text
    # The text of each group runs from its title to the next title.
    starts = sorted((text.index(f"\n{title}:\n"), title) for title in GROUPS)
    for (start, title), (end, _) in zip(starts, starts[1:] + [(len(text), None)]):
        sections[title] = text[start:end]
    for f in dataclasses.fields(RunConfig):
        flag = f.metadata.get("negative") if "negative" in f.metadata else f.metadata.get(
            "flag", "--fitness-opt" if f.name == "fitness_options" else "--" + f.name.replace("_", "-"))
        assert f"  {flag}" in sections[f.metadata["group"]], f"{flag} not under {f.metadata['group']}"
    assert "  --resume RUN" in sections["storage and resume"] and "  --config" in sections["storage and resume"]


def test_add_arguments_returns_the_groups_for_more_flags():
    parser = argparse.ArgumentParser()
    groups = add_arguments(parser)
    assert list(groups) == list(GROUPS)
    groups["storage and resume"].add_argument("--extra")
    assert parser.parse_args(["--extra", "x", "--pop", "3"]).extra == "x"


def test_data_dir_reaches_plugins_that_take_it(tmp_path):
    config = RunConfig(fitness="cifar10", data_dir=str(tmp_path))
    assert config.stages()[0].options == {"data_dir": str(tmp_path)}
    ladder = RunConfig(fitness="synthetic-pref>cifar10", data_dir=str(tmp_path)).stages()
    assert ladder[0].options == {} and ladder[1].options == {"data_dir": str(tmp_path)}
    # An option set for the stage wins over the flag.
    explicit = RunConfig(fitness="cifar10", data_dir="/elsewhere", fitness_options={"data_dir": str(tmp_path)})
    assert explicit.stages()[0].options == {"data_dir": str(tmp_path)}
    assert RunConfig(fitness="cifar10").stages()[0].options == {}


def test_data_dir_for_a_plugin_without_data_names_the_flag():
    with pytest.raises(ValueError, match="--data-dir: fitness 'synthetic-pref' takes no data folder"):
        RunConfig(fitness="synthetic-pref", data_dir="/data").stages()


def test_data_dir_flag_and_toml_resolve_to_the_setting(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('fitness = "cifar10"\ndata_dir = "/from/toml"\n')
    parser = build_parser()
    assert resolve(parser.parse_args(["run", "--config", str(toml)])).data_dir == "/from/toml"
    assert resolve(parser.parse_args(["run", "--config", str(toml), "--data-dir", "/flag"])).data_dir == "/flag"


def test_run_passes_data_dir_to_cifar10_and_evoloss_data_still_works(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = ["--out", str(tmp_path / "run"), "--executor", "serial", "--quiet"]
    monkeypatch.delenv("EVOLOSS_DATA", raising=False)
    assert main(["run", "--fitness", "cifar10", "--data-dir", str(empty), *out]) == 2
    assert f"no CIFAR-10 batches in {empty} (from data_dir)" in capsys.readouterr().err
    monkeypatch.setenv("EVOLOSS_DATA", str(empty))
    assert main(["run", "--fitness", "cifar10", *out]) == 2
    assert f"no CIFAR-10 batches in {empty} (from EVOLOSS_DATA)" in capsys.readouterr().err
    assert main(["run", "--fitness", "synthetic-pref", "--data-dir", str(empty), *out]) == 2
    assert "--data-dir" in capsys.readouterr().err
