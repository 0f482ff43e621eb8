"""The doc test's reading of commands: as the shell splits them, as Hydra composes them."""

import pytest
from hydra.errors import HydraException

from .commands import ROOT, HydraCommand, compose_command, overrides_of

def test_a_brace_pattern_that_the_shell_unquotes_fails_to_compose():
    """The command the README once showed: the shell strips the quotes, Hydra then refuses the braces."""
    markdown = "```bash\npython train.py data=shards data.train_shards='/data/laion/{00000..09999}.tar'\n```\n"
    path = ROOT / "tests" / "docs" / "_never_written.md"
    (command,) = [c for c in _commands_of(markdown, path)]
    assert command.arguments[-1] == "data.train_shards=/data/laion/{00000..09999}.tar"
    with pytest.raises(HydraException, match="mismatched input '{'"):
        compose_command(command)


def test_continuations_comments_ellipsis_and_sweeps_are_read_as_the_shell_and_hydra_read_them():
    markdown = ("  ```bash\n  python train.py --multirun model.optimizer.lr=1e-4,3e-4 ... \\\n"
                "      trainer.max_steps=5   # two jobs\n  ```\n")
    (command,) = _commands_of(markdown, ROOT / "x.md")
    assert command.line == 2
    assert command.arguments == ("--multirun", "model.optimizer.lr=1e-4,3e-4", "...", "trainer.max_steps=5")
    assert overrides_of(command.arguments) == ["model.optimizer.lr=0.0001", "trainer.max_steps=5"]
    assert compose_command(command).model.optimizer.lr == pytest.approx(1e-4)


def _commands_of(markdown: str, path):
    from .commands import bash_blocks, shell_commands

    return [HydraCommand(path.name, line, text, argv[1], tuple(argv[2:]))
            for first, block in bash_blocks(markdown) for line, text, argv in shell_commands(block, first)
            if argv[1] in ("train.py", "eval.py")]
