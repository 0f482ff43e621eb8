"""rank_and_world_size: the process group's view when there is one, else the launcher's environment."""

from __future__ import annotations

import pytest

from ldm.ranks import rank_and_world_size


def test_without_a_process_group_the_launcher_environment_decides(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_and_world_size() == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_and_world_size() == (3, 4)
    assert rank_and_world_size(from_launcher=False) == (0, 1)  # collectives need a process group


@pytest.mark.parametrize(("rank", "world_size", "message"), [("1", "x", "must be integers"),
                                                             ("4", "4", "RANK=4 must lie in")])
def test_a_bad_launcher_environment_is_named(monkeypatch, rank, world_size, message):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    with pytest.raises(ValueError, match=message):
        rank_and_world_size()
