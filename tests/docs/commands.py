"""Shell commands of markdown docs, and Hydra composition of the train.py / eval.py ones.

A doc test lists a file's commands with ``hydra_commands`` and composes each with ``compose_command``:
in-process, through Hydra's compose API, like ``--cfg job`` (nothing runs), so a quoting or key error
in a documented command fails a test instead of a reader's first run.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from ldm.config import register_resolvers

ROOT = Path(__file__).resolve().parents[2]
CONFIG_NAMES = {"train.py": "train", "eval.py": "eval"}
# Flags of Hydra's command line that change what is printed or launched, not what is composed.
FLAGS_WITHOUT_VALUE = {"-m", "--multirun", "--resolve"}
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p"}
# A lone "..." in a documented command stands for the reader's other overrides.
ELLIPSIS = "..."

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[ \t]*$")


@dataclass(frozen=True)
class HydraCommand:
    """One documented ``python train.py|eval.py ...`` command: the line as written, where it is, its argv."""

    source: str
    line: int
    text: str
    script: str
    arguments: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.text}"


def bash_blocks(markdown: str) -> list[tuple[int, str]]:
    """The ```bash (or ```sh / ```shell) fenced blocks of ``markdown``: (first line number, text), fences
    indented as in list items included, their indentation removed."""
    blocks, lines = [], markdown.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, body, start = opening["indent"], [], index + 2
        index += 1
        while index < len(lines) and _FENCE.match(lines[index]) is None:
            body.append(lines[index][len(indent):] if lines[index].startswith(indent) else lines[index])
            index += 1
        index += 1  # the closing fence
        if opening["lang"] in ("bash", "sh", "shell"):
            blocks.append((start, "\n".join(body)))
    return blocks


def shell_commands(block: str, first_line: int = 1) -> list[tuple[int, str, list[str]]]:
    """Each command of a shell block: (line number, text, argv as the shell splits it). Backslash
    continuations are joined and ``#`` comments dropped; a ``$ `` prompt is removed."""
    commands, pending, start = [], "", first_line
    for offset, line in enumerate(block.splitlines()):
        if not pending:
            start = first_line + offset
            line = line[2:] if line.startswith("$ ") else line
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        argv = shlex.split(text, comments=True)
        if argv:
            commands.append((start, text, argv))
    return commands


def hydra_commands(path: Path) -> list[HydraCommand]:
    """Every ``python train.py ...`` / ``python eval.py ...`` command in the bash blocks of ``path``."""
    found = []
    for first_line, block in bash_blocks(path.read_text()):
        for line, text, argv in shell_commands(block, first_line):
            if len(argv) >= 2 and argv[0] in ("python", "python3") and argv[1] in CONFIG_NAMES:
                found.append(HydraCommand(path.name, line, text, argv[1], tuple(argv[2:])))
    return found


def overrides_of(arguments: tuple[str, ...] | list[str]) -> list[str]:
    """The config overrides of a command's arguments: Hydra's flags and lone ``...`` dropped; a sweep
    (``--multirun key=a,b``) reduced to its first job's overrides."""
    overrides, multirun, arguments = [], False, list(arguments)
    while arguments:
        argument = arguments.pop(0)
        if argument in FLAGS_WITH_VALUE:
            arguments.pop(0)
        elif argument in FLAGS_WITHOUT_VALUE:
            multirun = multirun or argument in ("-m", "--multirun")
        elif argument.startswith("-"):
            raise ValueError(f"the doc test does not know the flag {argument!r}; teach tests/docs/commands.py")
        elif argument != ELLIPSIS:
            overrides.append(argument)
    if multirun:
        parsed = OverridesParser.create().parse_overrides(overrides)
        overrides = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0][0]
    return overrides


def compose_command(command: HydraCommand) -> DictConfig:
    """Compose ``command``'s config (with Hydra's own node, so launcher and sweeper overrides count),
    as ``--cfg job`` would print it; raises what Hydra raises on a bad override."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(CONFIG_NAMES[command.script], overrides=overrides_of(command.arguments),
                       return_hydra_config=True)


_INLINE_COMMAND = re.compile(r"`((?:python3? |make )[^`]+)`")
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class ShellCommand:
    """Any documented shell command: from a bash block or an inline code span that starts with python or make."""

    source: str
    line: int
    text: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.text}"


def documented_commands(path: Path) -> list[ShellCommand]:
    """Every command of ``path``: each line of its bash blocks, and inline `python ...` / `make ...` spans."""
    markdown = path.read_text()
    found = [ShellCommand(path.name, line, text, tuple(argv))
             for first, block in bash_blocks(markdown) for line, text, argv in shell_commands(block, first)]
    for number, line in enumerate(markdown.splitlines(), start=1):
        for span in _INLINE_COMMAND.findall(line):
            found.append(ShellCommand(path.name, number, span, tuple(shlex.split(span))))
    return found


class ArgumentsParsed(Exception):
    """Raised in place of running a program once its command line has been parsed."""


@contextmanager
def stop_after_parsing():
    """While active, ``ArgumentParser.parse_args`` parses as usual (exiting with status 2 on a bad option) and
    then raises ``ArgumentsParsed`` instead of letting the program run."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise ArgumentsParsed

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def parse_program_arguments(argv: tuple[str, ...]) -> None:
    """Run ``python -m MODULE ARGS`` or ``python SCRIPT ARGS`` in this process up to its argument parsing:
    unknown options or bad values fail (SystemExit 2), nothing after the parsing runs."""
    if argv[1] == "-m":
        target, arguments, run = argv[2], list(argv[3:]), runpy.run_module
    else:
        target, arguments, run = str(ROOT / argv[1]), list(argv[2:]), runpy.run_path
    saved = sys.argv
    sys.argv = [target, *arguments]
    try:
        with stop_after_parsing():
            run(target, run_name="__main__")
    except ArgumentsParsed:
        return
    except SystemExit as exit_:
        if exit_.code == 0 and ("--help" in arguments or "-h" in arguments):
            return
        raise
    finally:
        sys.argv = saved
    raise AssertionError(f"{' '.join(argv)} ran to its end without parsing arguments with argparse")
