"""``deltactl theory check``: every statement has its page in theory/, the table, exit codes, one statement only."""

from pathlib import Path

import pytest

from deltactl.cli import main
from deltactl.theory import statements
from deltactl.theory.statements import STATEMENTS, Statement, run, table

THEORY = Path(__file__).resolve().parent.parent / "theory"


@pytest.mark.parametrize("name", list(STATEMENTS))
def test_each_statement_has_its_page_with_the_command(name):
    page = THEORY / f"{name}.md"
    assert page.is_file(), f"theory/{name}.md is missing"
    text = page.read_text()
    assert f"deltactl theory check --only {name}" in text
    assert "## Statement" in text and "## Argument" in text


def test_fast_statements_hold_and_print_a_table(capsys):
    assert main(["theory", "check", "--only", "lora-tangent", "did-affine"]) == 0
    out = capsys.readouterr().out
    assert "lora-tangent" in out and "did-affine" in out and "pass" in out and "all 2 statements hold" in out


def test_a_failing_statement_exits_with_1(monkeypatch, capsys):
    wrong = Statement("wrong", "1 = 2", "none", 0.0, lambda: (1.0, "measured 1"))
    monkeypatch.setitem(statements.STATEMENTS, "wrong", wrong)
    with pytest.raises(SystemExit) as exit_:
        main(["theory", "check", "--only", "wrong"])
    assert exit_.value.code == 1
    assert "FAIL" in capsys.readouterr().out


def test_a_check_that_raises_fails_with_its_reason(monkeypatch):
    def broken():
        raise RuntimeError("no such site")

    monkeypatch.setitem(statements.STATEMENTS, "broken", Statement("broken", "x", "none", 1.0, broken))
    (result,) = run(["broken"])
    assert not result.passed and "RuntimeError: no such site" in table([result])


def test_unknown_statement_is_a_clean_error(capsys):
    assert main(["theory", "check", "--only", "costate"]) == 2
    assert "unknown statement 'costate'; known: costates" in capsys.readouterr().err


def test_list(capsys):
    assert main(["theory", "check", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in STATEMENTS)
