"""The README cannot rot: every `vadflow ...` line in its code blocks is a real command.

Each line of a fenced code block that starts with `vadflow ` is read as a user would type it
(comments, `[...]` brackets around optional parts and `...` dropped; placeholders such as DATA
stay as values) and checked against the real command tree: the command path exists and every
option it uses is one of that command's options. Nothing is run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from vadflow.flows.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)


def readme_commands(text: str) -> list[str]:
    """Every `vadflow ...` line of the fenced code blocks of `text`, comments removed."""
    lines = []
    for block in FENCE.findall(text):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("vadflow ") or line == "vadflow":
                lines.append(line.split(" #", 1)[0].strip())
    return lines


def problems(line: str) -> list[str]:
    """What is wrong with one command line against the real CLI (empty: nothing)."""
    text = line.replace("...", " ").replace("[", " ").replace("]", " ")
    words = shlex.split(text)[1:]  # drop "vadflow"
    command = typer.main.get_command(app)
    path = ["vadflow"]
    while words and hasattr(command, "commands") and not words[0].startswith("-"):
        name = words.pop(0)
        if name not in command.commands:
            return [f"{' '.join(path)} has no command {name!r}"]
        command = command.commands[name]
        path.append(name)
    known = {"-h", "--help"}
    for param in command.params:
        known.update(param.opts)
        known.update(getattr(param, "secondary_opts", []))
    if hasattr(command, "commands") and not any(w in known for w in words):  # e.g. --version
        return [f"{' '.join(path)} needs a command: one of {', '.join(command.commands)}"]
    found = []
    for word in words:
        if word.startswith("-"):
            option = word.split("=", 1)[0]
            if option not in known:
                found.append(f"{' '.join(path)} has no option {option}")
    return found


def test_the_checker_finds_a_wrong_command_and_a_wrong_option() -> None:
    assert problems("vadflow run DATA/site-a --family ae_l2 --epochs 10") == []
    assert problems("vadflow demo [--domain industrial]") == []
    assert problems("vadflow runn DATA") == ["vadflow has no command 'runn'"]
    assert problems("vadflow run DATA --epoch 3") == ["vadflow run has no option --epoch"]
    assert problems("vadflow synth DATA") == ["vadflow synth has no command 'DATA'"]
    assert problems("vadflow tracking") == ["vadflow tracking needs a command: one of status, sync"]
    assert problems("vadflow --version") == [] and problems("vadflow sites -h") == []


def test_readme_has_command_lines() -> None:
    lines = readme_commands(README.read_text())
    assert len(lines) >= 15, lines
    assert any(line.startswith("vadflow demo") for line in lines)


@pytest.mark.parametrize("line", readme_commands(README.read_text()))
def test_every_readme_command_exists(line: str) -> None:
    assert problems(line) == []
