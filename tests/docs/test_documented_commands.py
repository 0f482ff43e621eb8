"""Every shell command in README.md and docs/ runs as far as it can without training: Hydra commands compose,
python programs parse their arguments, make targets run dry."""

from __future__ import annotations

import subprocess

import pytest

from .commands import (DOC_FILES, ROOT, HydraCommand, ShellCommand, compose_command, documented_commands,
                       overrides_of, parse_program_arguments)

COMMANDS = [command for path in DOC_FILES for command in documented_commands(path)]


def test_every_doc_file_is_read_and_has_commands():
    assert {path.name for path in DOC_FILES} >= {"README.md", "data.md", "models.md", "evaluation.md", "training.md"}
    sources = {command.source for command in COMMANDS}
    assert sources >= {"README.md", "data.md", "models.md", "evaluation.md", "training.md"}


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_documented_command_runs_as_far_as_it_can_without_training(command: ShellCommand):
    argv = command.argv
    if argv[0] == "make":
        completed = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert completed.returncode == 0, completed.stderr
    elif argv[0] in ("python", "python3") and argv[1] in ("train.py", "eval.py"):
        hydra_command = HydraCommand(command.source, command.line, command.text, argv[1], argv[2:])
        cfg = compose_command(hydra_command)
        for override in overrides_of(hydra_command.arguments):
            key, _, value = override.partition("=")
            if key.startswith("data.") and "{" in value:  # a brace pattern reaches the config whole
                assert "{" in str(cfg.data[key.split(".", 1)[1]])
    elif argv[0] in ("python", "python3"):
        parse_program_arguments(argv)
    else:
        pytest.fail(f"{command}: the doc test does not know how to run {argv[0]!r}; teach tests/docs/")
