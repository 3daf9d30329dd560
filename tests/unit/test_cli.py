"""The commands' flags come from the settings table: every flag, its variables and its default in --help."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from worker.cli import DOCTOR_SETTINGS, RUN_SETTINGS, app
from worker.settings import OPTIONS, OPTIONS_BY_NAME, shown_default


def help_of(command: str) -> str:
    done = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "1000", "NO_COLOR": "1"})
    assert done.exit_code == 0, done.output
    return done.output


def test_run_takes_every_setting_that_has_a_flag() -> None:
    assert set(RUN_SETTINGS) == {option.name for option in OPTIONS if option.flag}
    assert set(DOCTOR_SETTINGS) <= set(RUN_SETTINGS)


@pytest.mark.parametrize(("command", "names"), [("run", RUN_SETTINGS), ("doctor", DOCTOR_SETTINGS)])
def test_help_lists_every_flag_with_its_variables_and_default(command: str, names: tuple[str, ...]) -> None:
    lines = help_of(command).splitlines()
    for name in names:
        option = OPTIONS_BY_NAME[name]
        [line] = [line for line in lines if f" {option.flag} " in line]
        assert f"[env: {', '.join(option.env)}]" in line
        default = shown_default(name)
        assert (f"[default: {default}]" in line) == (default is not None), line
