"""The README stays a short product page whose commands work: every `cavga SUBCOMMAND --flag` line of its shell
blocks names a real subcommand and real flags of `cavga.cli.build_parser()`, its links into the repository point
at files that exist, and its set-up and test commands are the ones CI runs."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from cavga.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 250
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
SETUP_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[dev]' && .venv/bin/cavga demo"
TEST_COMMAND = ".venv/bin/python -m pytest -q"

_FENCE = re.compile(r"^```(\w*)\s*$")
_FLAG = re.compile(r"^--?[A-Za-z][\w-]*")


def shell_blocks(text: str) -> list[str]:
    """The bodies of the fenced code blocks tagged as shell."""
    blocks, body, language = [], None, ""
    for line in text.splitlines():
        fence = _FENCE.match(line.strip())
        if fence and body is None:
            body, language = [], fence.group(1).lower()
        elif line.strip() == "```" and body is not None:
            if language in SHELL_LANGUAGES:
                blocks.append("\n".join(body))
            body = None
        elif body is not None:
            body.append(line)
    return blocks


def shell_commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block as token lists: continuation lines joined, comments dropped, split at
    `&&`, `||`, `;` and a `|` standing alone (a `|` inside a word, as in `--format onnx|pt2`, lists choices)."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            ends = token.endswith(";") and token != ";"
            token = token.rstrip(";") if ends else token
            if token in ("&&", "||", "|", ";"):
                commands.append(current)
                current = []
                continue
            current.append(token)
            if ends:
                commands.append(current)
                current = []
        commands.append(current)
    return [c for c in commands if c]


def _cavga_start(tokens: list[str]) -> int | None:
    """Index of the first token after the program name `cavga` (also `.venv/bin/cavga`, `-m cavga.cli`)."""
    for i, token in enumerate(tokens):
        if token == "cavga" or token.endswith("/cavga"):
            return i + 1
        if token in ("cavga.cli", "cavga") and i > 0 and tokens[i - 1] == "-m":
            return i + 1
    return None


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("cavga's parser has no subcommands")


def check_commands(text: str, parser: argparse.ArgumentParser | None = None) -> tuple[int, list[str]]:
    """(number of cavga commands checked, problems) for the shell blocks of ``text``. A problem is a cavga
    command without a known subcommand, or a flag that the subcommand's parser (or the main parser, before the
    subcommand) does not define."""
    parser = parser or build_parser()
    commands = _subparsers(parser)
    checked, problems = 0, []
    for block in shell_blocks(text):
        for tokens in shell_commands(block):
            start = _cavga_start(tokens)
            if start is None:
                continue
            checked += 1
            line = " ".join(tokens)
            rest = tokens[start:]
            while rest and rest[0].startswith("-"):  # options of the main parser (-v, --version)
                flag = rest.pop(0)
                if flag not in parser._option_string_actions:
                    problems.append(f"{line}: unknown option {flag} of cavga")
            if not rest:
                continue
            name, args = rest[0], rest[1:]
            if name not in commands:
                problems.append(f"{line}: unknown subcommand {name!r}")
                continue
            known = commands[name]._option_string_actions
            for arg in args:
                for part in arg.strip("[]").split("|"):  # "[--a | --b]" and "--format onnx|pt2" alike
                    flag = _FLAG.match(part.strip("[]"))
                    if flag and flag.group(0) not in known:
                        problems.append(f"{line}: cavga {name} has no option {flag.group(0)}")
    return checked, problems


def local_links(text: str) -> list[str]:
    """Targets of the Markdown links and images of ``text`` that point into the repository."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; the limit is {MAX_LINES} (move detail to docs/)"


def test_readme_cavga_commands_parse():
    checked, problems = check_commands(README.read_text(encoding="utf-8"))
    assert checked >= 5, f"only {checked} cavga commands found in the README's shell blocks: is the extractor broken?"
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "line",
    [
        "cavga train DATA --out models/x --made-up-flag 3",
        "cavga predict MODEL images/ --out OUT \\\n    --no-such-option",
        ".venv/bin/cavga evaluate MODEL DATA --out OUT --category c && cavga serve MODEL --bogus",
        "cavga trian DATA --out models/x",
        "torchrun --nproc_per_node=2 -m cavga.cli train DATA --out M --epochz 3",
        "cavga export MODEL [--format onnx|pt2] [--outfile FILE]",
    ],
)
def test_checker_rejects_a_bad_command(line):
    text = f"Intro.\n\n```bash\ncavga demo\n{line}\n```\n"
    checked, problems = check_commands(text)
    assert checked >= 2
    assert problems, f"the checker accepted {line!r}"


def test_checker_accepts_good_commands_and_skips_other_blocks():
    text = (
        "```bash\ncavga train DATA --out M --category c \\\n      --epochs 2  # a comment --not-a-flag\n"
        "cavga export M [--format onnx|pt2] [--out FILE]\n```\n\n"
        "```python\ncavga.Cavga(made_up=1)  # cavga train --bogus, not shell\n```\n"
    )
    assert check_commands(text) == (2, [])


def test_readme_copy_with_a_made_up_flag_fails():
    text = README.read_text(encoding="utf-8")
    broken = text.replace(
        "cavga predict models/bottle images/ --out predictions/",
        "cavga predict models/bottle images/ --out predictions/ --fast-mode",
        1,
    )
    assert broken != text, "the README's predict example changed: update this test"
    _, problems = check_commands(broken)
    assert any("--fast-mode" in p for p in problems)


def test_readme_links_exist():
    text = README.read_text(encoding="utf-8")
    missing = [t for t in local_links(text) if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_readme_setup_and_test_commands_are_what_ci_runs():
    text = README.read_text(encoding="utf-8")
    assert SETUP_COMMAND in text
    assert TEST_COMMAND in text
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert TEST_COMMAND in ci
    assert "python3 -m venv .venv" in ci and "-c constraints.txt -e '.[dev]'" in ci
