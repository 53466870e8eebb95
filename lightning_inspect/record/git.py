"""The git state of the working tree a run starts from, read with the ``git`` CLI."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path
from typing import Any

#: Diffs longer than this many characters are cut (with a note at the end).
MAX_DIFF_CHARS = 20_000_000


@dataclasses.dataclass(frozen=True)
class GitInfo:
    """Commit, branch, dirty flag, diff and untracked files; ``notice`` says what is missing."""

    commit: str | None = None
    branch: str | None = None
    dirty: bool | None = None
    diff: str = ""
    untracked: tuple[str, ...] = ()
    root: str | None = None
    notice: str | None = None

    def summary(self) -> dict[str, Any]:
        """Everything but the diff, as plain values."""
        out = dataclasses.asdict(self)
        del out["diff"]
        return {**out, "untracked": list(self.untracked)}


class _GitFailed(Exception):
    """A git command failed; the message is the notice to record."""


def _git(args: list[str], cwd: str, timeout: float) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    command = f"'git {' '.join(args)}'"
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
            timeout=timeout, check=False,
        )  # fmt: skip
    except FileNotFoundError as exc:
        raise _GitFailed("git is not installed (no 'git' executable on PATH)") from exc
    except subprocess.TimeoutExpired as exc:
        raise _GitFailed(f"{command} did not finish within {timeout:g} s") from exc
    except OSError as exc:
        raise _GitFailed(f"git could not be started ({exc})") from exc
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise _GitFailed(message[0] if message else f"{command} exited with {done.returncode}")
    return done.stdout.decode("utf-8", "replace")


def git_info(
    repo_dir: str | os.PathLike[str] | None = None, timeout: float = 10.0, diff: bool = True
) -> GitInfo:
    """The git state of the repository holding ``repo_dir`` (default: the working directory).

    Never raises: what could not be read is in :attr:`GitInfo.notice`. ``dirty``: tracked files
    differ from the commit; the diff is ``git diff HEAD`` (untracked files are only listed).

    Example:
        >>> import tempfile
        >>> git_info(tempfile.mkdtemp()).commit is None
        True
    """
    where = str(Path(repo_dir if repo_dir is not None else os.getcwd()).resolve())
    if not Path(where).is_dir():
        return GitInfo(notice=f"{where} is not a directory")
    try:
        root = _git(["rev-parse", "--show-toplevel"], where, timeout).strip()
    except _GitFailed as exc:
        outside = "not a git repository" in str(exc).lower()
        return GitInfo(notice=f"{where} is not inside a git repository" if outside else str(exc))
    try:
        commit = _git(["rev-parse", "--verify", "HEAD"], root, timeout).strip()
    except _GitFailed:
        return GitInfo(root=root, notice=f"the repository at {root} has no commits yet")
    notices: list[str] = []
    try:
        branch = _git(["symbolic-ref", "--short", "-q", "HEAD"], root, timeout).strip() or None
    except _GitFailed:
        branch = None
        notices.append("detached HEAD (no branch)")
    dirty: bool | None = None
    untracked: list[str] = []
    try:
        status = _git(["status", "--porcelain=v1", "-z", "--untracked-files=normal"], root, timeout)
        dirty, skip = False, False
        for entry in status.split("\0"):
            if skip or not entry:
                skip = False
            elif entry.startswith("??"):
                untracked.append(entry[3:])
            else:
                dirty, skip = True, entry[0] in "RC"  # a rename/copy is followed by its source
    except _GitFailed as exc:
        notices.append(f"status unavailable: {exc}")
    patch = ""
    if diff and dirty:
        try:
            patch = _git(
                ["diff", "HEAD", "--no-color", "--no-ext-diff", "--no-textconv"], root, timeout
            )
        except _GitFailed as exc:
            notices.append(f"diff unavailable: {exc}")
        if len(patch) > MAX_DIFF_CHARS:
            patch = patch[:MAX_DIFF_CHARS] + f"\n# [diff cut at {MAX_DIFF_CHARS} characters]\n"
    return GitInfo(commit, branch, dirty, patch, tuple(untracked), root, "; ".join(notices) or None)
