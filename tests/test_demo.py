"""`make demo` stays true: the demo runs end to end and reports success."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.tools.demo import run_demo


def test_the_demo_delivers_every_valid_lead_once_and_dead_letters_the_malformed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)

    assert run_demo() == 0

    output = capsys.readouterr().out
    assert "demo passed" in output
    assert "InvalidLead" in output
    assert (tmp_path / ".leadwriter" / "demo" / "broker.db").exists()
