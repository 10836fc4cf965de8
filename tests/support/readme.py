"""The README's command blocks, run as a user types them.

Each ```sh block of README.md follows a marker line:

    <!-- run by the tests: <id> -->        a test runs the block exactly as written
    <!-- not run by the tests: <why> -->   it cannot run on these machines (the reason says why)

A test takes a block by its id (`commands(id)`) and runs its commands, line by line, in a
`Session`: a shell whose working directory is a fresh copy of the checkout and whose
environment carries over from one line to the next, as a terminal's does. A block of a
transcript (lines starting with `$ `) holds each command's expected output below it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
_MARKER = re.compile(r"<!-- (run by the tests: (?P<id>[a-z0-9-]+)|not run by the tests: (?P<why>.+)) -->")


# The kinds of block a user runs: shell commands, and Python.
LANGUAGES = ("sh", "python")


@dataclass(frozen=True)
class Block:
    id: str | None  # None: not run by the tests
    why_not: str | None
    language: str
    text: str
    line: int  # where the block starts in README.md


def blocks() -> list[Block]:
    """Every ```sh and ```python block of the README with its marker (id and why_not both
    None: it has none)."""
    found, lines = [], README.read_text().splitlines()
    for number, line in enumerate(lines):
        if not line.startswith("```") or line[3:].strip() not in LANGUAGES:
            continue
        end = next(i for i in range(number + 1, len(lines)) if lines[i].strip() == "```")
        marker = _MARKER.fullmatch(lines[number - 1].strip()) if number else None
        found.append(
            Block(
                marker["id"] if marker else None,
                marker["why"] if marker else None,
                line[3:].strip(),
                "\n".join(lines[number + 1 : end]) + "\n",
                number + 1,
            )
        )
    return found


def output(block_id: str) -> str:
    """The text block the README shows as what a block's commands print (marked
    `<!-- the output of: <id> -->`)."""
    lines = README.read_text().splitlines()
    start = lines.index(f"<!-- the output of: {block_id} -->") + 2
    end = next(i for i in range(start, len(lines)) if lines[i].strip() == "```")
    return "\n".join(lines[start:end])


def block(block_id: str) -> Block:
    matching = [b for b in blocks() if b.id == block_id]
    assert len(matching) == 1, f"README.md has {len(matching)} blocks marked 'run by the tests: {block_id}'"
    return matching[0]


def commands(block_id: str) -> list[str]:
    """The commands of a block, in order: a command continued with a backslash is one, a
    line that is only a comment is none, and of a transcript only the `$ ` lines count. A
    comment after a command stays: the shell ignores it, as it would."""
    text = block(block_id).text
    if is_transcript(block_id):
        return [line[2:] for line in text.splitlines() if line.startswith("$ ")]
    result, current = [], ""
    for line in text.splitlines():  # a continued line stays as typed: bash reads the backslash itself
        if not current and line.lstrip().startswith("#"):
            continue  # a comment line: what a command prints, shown to the reader
        current += line + "\n"
        if not line.endswith("\\") and current.strip():
            result.append(current.rstrip("\n"))
            current = ""
    return result


def is_transcript(block_id: str) -> bool:
    return block(block_id).text.startswith("$ ")


def transcript(block_id: str) -> list[tuple[str, str]]:
    """(command, its expected output) for each `$ ` line of a transcript block."""
    pairs: list[tuple[str, list[str]]] = []
    for line in block(block_id).text.splitlines():
        if line.startswith("$ "):
            pairs.append((line[2:], []))
        else:
            pairs[-1][1].append(line)
    return [(command, "\n".join(output)) for command, output in pairs]


def fresh_clone(destination: Path) -> Path:
    """The checkout as a fresh clone of it would be: its tracked files and the new ones git
    does not ignore (what a commit of the working tree would hold), nothing it has built."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    return destination


def user_environment() -> dict[str, str]:
    """The environment of a user's shell: none of what the test run set for itself, nor what
    the `make test` that runs it set (a make inside a make says "Entering directory")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "BOUQUET_", "FLWR_"))}
    for name in ("PYTHONPATH", "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES"):
        env.pop(name, None)
    return env


@dataclass
class Result:
    command: str
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@dataclass
class Session:
    """A shell session: each command runs in bash from the session's directory with the
    session's environment, and what it exports or where it cds stays for the next one."""

    cwd: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    history: list[Result] = field(default_factory=list)

    def run(self, command: str, timeout: float = 600, check: bool = True) -> Result:
        with tempfile.TemporaryDirectory() as scratch:
            state = Path(scratch) / "env"
            script = f"set -o pipefail\n{command}\n__rc=$?\nenv -0 > {state}\nexit $__rc\n"
            done = subprocess.run(["bash", "-c", script], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
            if state.exists():
                carried = dict(item.split("=", 1) for item in state.read_text().split("\0") if "=" in item)
                for name in ("SHLVL", "_", "__rc", "OLDPWD"):
                    carried.pop(name, None)
                self.env = carried
                self.cwd = Path(carried.get("PWD", self.cwd))
        result = Result(command, done.returncode, done.stdout, done.stderr)
        self.history.append(result)
        if check and done.returncode != 0:
            raise AssertionError(
                f"the README's command failed (exit {done.returncode}):\n$ {command}\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
            )
        return result

    def run_block(self, block_id: str, timeout: float = 600) -> list[Result]:
        return [self.run(command, timeout) for command in commands(block_id)]
