"""The README's test command (what CI runs) and ``nox -s tests`` run the same checks."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_test_command() -> str:
    """The line between the README's test-command markers, as CI reads it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- test-command -->\n```\n(.*?)\n```\n<!-- /test-command -->", text, re.S)
    assert block, "no test-command block in README.md"
    return block.group(1).strip()


def nox_test_commands() -> list[str]:
    """The commands the noxfile's ``tests`` session runs (``session.run``), without posargs."""
    tree = ast.parse((ROOT / "noxfile.py").read_text(encoding="utf-8"))
    [session] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "tests"]
    return [
        " ".join(a.value for a in call.args if isinstance(a, ast.Constant))
        for call in ast.walk(session)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "run"
    ]


def test_readme_command_lints_formats_and_runs_doctests_like_nox() -> None:
    commands = nox_test_commands()
    assert commands[:2] == ["ruff check .", "ruff format --check ."]
    assert "--doctest-modules lightning_inspect" in commands[2]
    install = '. .venv/bin/activate && pip install -e ".[test]"'
    assert readme_test_command() == " && ".join([install, *commands])
