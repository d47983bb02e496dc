"""The shell commands in README.md and docs/*.md run as written.

Convention: a fenced block whose info string is ``console test`` is run
(GitHub and PyPI highlight it as ``console``). In it:

- a line starting with ``$ `` is a command; a trailing ``\\`` continues it on
  the next line, and a here-document (``<<'EOF'`` ... ``EOF``) is part of it;
- every other line is sample output, shown to the reader and not compared;
- a command must exit 0, unless it ends with a comment ``# exits N``.

All runnable blocks of one file run in order in one ``bash`` session (so
``export`` and files carry over), in a fresh empty directory, with no
``KOMBU_ENVELOPE_*`` variables set. ``redis://localhost:6379/0`` and
``amqp://guest:guest@localhost:5672//`` are replaced by the test's own Redis
database and RabbitMQ. Plain ``console`` blocks (``pip install``, ``tox``)
are not run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REDIS_IN_DOCS = "redis://localhost:6379/0"
AMQP_IN_DOCS = "amqp://guest:guest@localhost:5672//"

_BLOCK = re.compile(r"^```console test[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")
_EXITS = re.compile(r"#\s*exits\s+(\d+)\s*$")


def runnable_commands(markdown: str) -> list[tuple[str, int]]:
    """(command, expected exit status) for every command of every runnable block, in order."""
    commands = []
    for block in _BLOCK.findall(markdown):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if not line.startswith("$ "):
                continue  # sample output
            command = [line[2:]]
            while command[-1].endswith("\\") and i < len(lines):
                command.append(lines[i])
                i += 1
            heredoc = _HEREDOC.search(" ".join(command))
            if heredoc:
                while i < len(lines):
                    command.append(lines[i])
                    i += 1
                    if lines[i - 1].strip() == heredoc.group(2):
                        break
            expected = _EXITS.search(command[0])
            commands.append(("\n".join(command), int(expected.group(1)) if expected else 0))
    return commands


def test_the_convention_reads_continuations_heredocs_exit_codes_and_skips_output():
    markdown = (
        "```console\n$ tox\n```\n"
        "```console test\n"
        "$ echo one \\\n  two\none two\n"
        "$ cat > f.py <<'EOF'\nx = 1\n$ not a command\nEOF\n"
        "$ false  # exits 1\n"
        "```\n"
    )
    assert runnable_commands(markdown) == [
        ("echo one \\\n  two", 0),
        ("cat > f.py <<'EOF'\nx = 1\n$ not a command\nEOF", 0),
        ("false  # exits 1", 1),
    ]


def script_for(commands: list[tuple[str, int]]) -> str:
    """A bash script that runs ``commands`` and stops at the first unexpected exit status."""
    parts = []
    for command, expected in commands:
        first = command.splitlines()[0]
        parts.append(f"echo {shlex.quote('$ ' + first)}")
        parts.append(command)
        parts.append(
            f"rc=$?; if [ $rc -ne {expected} ]; then "
            f'echo {shlex.quote("docs command failed: " + first)} "(exit $rc, expected {expected})" >&2; exit 99; fi'
        )
    return "\n".join(parts) + "\n"


RUNNABLE = [path for path in DOC_FILES if runnable_commands(path.read_text())]


def test_the_operator_docs_have_runnable_commands():
    assert {"operations.md", "migration.md"} <= {path.name for path in RUNNABLE}


@pytest.mark.parametrize("path", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_doc_commands_run_as_written(path, tmp_path, redis_db_url, amqp_url):
    script = script_for(runnable_commands(path.read_text()))
    script = script.replace(REDIS_IN_DOCS, redis_db_url).replace(AMQP_IN_DOCS, amqp_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOMBU_ENVELOPE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # kombu-envelope, celery
    env.pop("PYTHONPATH", None)
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


def test_troubleshooting_headings_quote_messages_the_code_still_writes():
    """Each backticked fragment in a troubleshooting heading occurs in our source, Celery's or Kombu's."""
    import celery
    import kombu

    sources = ""
    for package in (ROOT / "kombu_envelope", Path(celery.__file__).parent, Path(kombu.__file__).parent):
        sources += "".join(p.read_text(errors="replace") for p in package.rglob("*.py"))
    headings = re.findall(r"^### (.+)$", (ROOT / "docs" / "troubleshooting.md").read_text(), flags=re.M)
    fragments = [f for heading in headings for f in re.findall(r"`([^`]+)`", heading)]
    assert len(fragments) > 40
    assert [f for f in fragments if f not in sources] == []
