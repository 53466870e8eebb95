"""The git state of the working tree a run starts from, read with the ``git`` CLI."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

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
    notice: str | None = None


def _git(*args: str, cwd: str, timeout: float) -> str:
    """``git args`` output; a ``RuntimeError`` whose message is the notice to record."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, timeout=timeout
        )
    except FileNotFoundError as exc:
        raise RuntimeError("git is not installed (no 'git' executable on PATH)") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"'git {args[0]}' failed or took over {timeout:g} s ({exc})") from exc
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(lines[0] if lines else f"'git {args[0]}' exited with {done.returncode}")
    return done.stdout.decode("utf-8", "replace")


def git_info(
    repo_dir: str | os.PathLike[str] | None = None, timeout: float = 10.0, diff: bool = True
) -> GitInfo:
    """The git state of the repository holding ``repo_dir`` (default: the working directory).

    Never raises: what could not be read is in ``notice``. The diff is ``git diff HEAD``.

    Example:
        >>> import tempfile
        >>> git_info(tempfile.mkdtemp()).notice.endswith("is not inside a git repository")
        True
    """
    where = str(Path(repo_dir or os.getcwd()).resolve())
    try:
        status = _git("status", "--porcelain=v2", "--branch", "-z", cwd=where, timeout=timeout)
    except RuntimeError as exc:
        outside = "not a git repository" in str(exc).lower() or not Path(where).is_dir()
        return GitInfo(notice=f"{where} is not inside a git repository" if outside else str(exc))
    commit = branch = None
    dirty, untracked, notices = False, [], []
    entries = iter(status.split("\0"))
    for entry in entries:
        if entry.startswith("# branch.oid "):
            commit = entry.split(" ", 2)[2]
        elif entry.startswith("# branch.head "):
            branch = entry.split(" ", 2)[2]
        elif entry.startswith("? "):
            untracked.append(entry[2:])
        elif entry[:2] in ("1 ", "2 ", "u "):
            dirty = True
            if entry[0] == "2":  # a rename or copy: its source path follows
                next(entries, None)
    if commit in (None, "(initial)"):
        return GitInfo(notice=f"the repository at {where} has no commits yet")
    if branch == "(detached)":
        branch = None
        notices.append("detached HEAD (no branch)")
    patch = ""
    if diff and dirty:
        try:
            args = ("diff", "HEAD", "--no-color", "--no-ext-diff", "--no-textconv")
            patch = _git(*args, cwd=where, timeout=timeout)
        except RuntimeError as exc:
            notices.append(f"diff unavailable: {exc}")
        if len(patch) > MAX_DIFF_CHARS:
            patch = f"{patch[:MAX_DIFF_CHARS]}\n# [diff cut at {MAX_DIFF_CHARS} characters]\n"
    return GitInfo(commit, branch, dirty, patch, tuple(untracked), "; ".join(notices) or None)
