"""The README's configuration table and exit codes stay true to the code."""

from pathlib import Path

from worker.lifecycle import EXIT_CONFIG, EXIT_DONE, EXIT_WORK_REMAINS
from worker.settings import AUTH_MODES, OPTIONS, shown_default

README = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_two_commands() -> None:
    first_block = README.split("```")[1]
    assert [line.split()[:2] for line in first_block.strip().splitlines()] == [
        ["make", "demo"],
        ["make", "test"],
    ]


def code(value: str | None) -> str:
    return f"`{value}`" if value else "—"


def test_every_setting_is_in_the_configuration_table() -> None:
    rows = [line for line in README.splitlines() if line.startswith("| ")]
    for option in OPTIONS:
        matching = [row for row in rows if all(f"`{env}`" in row for env in option.env)]
        assert matching, f"README lacks a row for {option.name}"
        flag, _environment, job_key, default, *_ = (cell.strip() for cell in matching[0].split("|")[1:])
        assert (flag, job_key, default) == (
            code(option.flag),
            code(option.job_key),
            code(shown_default(option.name)),
        ), option.name


def test_every_auth_mode_is_documented() -> None:
    for mode in AUTH_MODES:
        assert f"`{mode}`" in README, mode


def test_exit_codes_are_documented() -> None:
    for code in (EXIT_DONE, EXIT_WORK_REMAINS, EXIT_CONFIG):
        assert f"\n| {code} |" in README
