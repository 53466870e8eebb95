"""Developer sessions: ``nox -s tests``, ``nox -s example``, ``nox -s bench``.

Each session installs torch's CPU build first (a plain ``torch`` requirement would pull a CUDA
build of several GB), then the project with the extras it needs.
"""

from __future__ import annotations

import nox

TORCH = "torch==2.13.0"
nox.options.sessions = ["tests"]


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Lint, format check, tests and doctests: the README's test command (what CI runs)."""
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run(
        "python",
        "-m",
        "pytest",
        "-q",
        "--doctest-modules",
        "lightning_inspect",
        "hydra_plugins",
        "tests",
        *session.posargs,
    )


@nox.session(python="3.11")
def example(session: nox.Session) -> None:
    """The example training app with every monitor on."""
    session.install(TORCH)
    session.install("-e", ".[examples]")
    session.run("python", "examples/train.py", "+inspect=all", *session.posargs)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Overhead benchmark against a plain run and the usual alternatives."""
    session.install(TORCH)
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/overhead.py", *session.posargs)
