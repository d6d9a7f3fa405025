"""The README and docs/ stay true to the code: commands parse, links resolve, the config reference is
the config's, requirements.txt is setup.cfg's, and the README stays short."""

from __future__ import annotations

import configparser
import concurrent.futures
import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lm.config import default_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
sys.path.insert(0, str(ROOT / "scripts"))
import config_reference  # noqa: E402


def _code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def _shell_commands(text: str) -> list[str]:
    """Commands of bash blocks, and `$ `-prompted lines of output blocks; continuations joined."""
    commands = []
    for language, body in _code_blocks(text):
        if language in ("bash", "sh", "shell"):
            lines = body.splitlines()
        elif language == "":
            lines = [line[2:] for line in body.splitlines() if line.startswith("$ ")]
            # a prompted command's continuation lines follow it
            joined, keep = [], False
            for line in body.splitlines():
                if line.startswith("$ "):
                    joined.append(line[2:])
                    keep = line.endswith("\\")
                elif keep:
                    joined.append(line)
                    keep = line.endswith("\\")
            lines = joined
        else:
            continue
        commands += [c.strip() for c in "\n".join(lines).replace("\\\n", " ").splitlines()
                     if c.strip() and not c.strip().startswith("#")]
    return commands


def _simple_commands(command: str) -> list[list[str]]:
    """Words of each simple command in a line (split at &&, ||, ;, |), env assignments dropped."""
    words = shlex.split(command, comments=True)
    out, current = [], []
    for word in words + [";"]:
        if word in ("&&", "||", ";", "|"):
            while current and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", current[0]):
                current = current[1:]
            if current:
                out.append(current)
            current = []
        else:
            current.append(word)
    return out


def _documented_commands() -> list[tuple[str, list[str]]]:
    return [(doc.name, words) for doc in DOCS for line in _shell_commands(doc.read_text())
            for words in _simple_commands(line)]


def _program(words: list[str]) -> tuple[list[str], list[str]] | None:
    """(how to run the program, its arguments) for an lm module or a script; None for others.
    A launcher's command is the one it runs: after `--`, or lm.train's flags for the SLURM script."""
    if words[0] == "sbatch" and "scripts/slurm_gpu.sbatch" in words:
        return ["python", "-m", "lm.train"], words[words.index("scripts/slurm_gpu.sbatch") + 1:]
    if words[0].startswith("scripts/") and "--" in words:
        return _program(words[words.index("--") + 1:])
    if words[:2] == ["python", "-m"] and words[2].startswith("lm."):
        return words[:3], words[3:]
    if words[0] == "python" and len(words) > 1 and words[1].startswith("scripts/"):
        return words[:2], words[2:]
    return None


def _missing_files(words: list[str]) -> list[str]:
    """Scripts a command runs that do not exist."""
    return [f"{w} does not exist" for w in words
            if re.fullmatch(r"scripts/[\w./-]+", w) and not (ROOT / w).is_file()]


@functools.cache
def _flags_of(program: tuple[str, ...]) -> frozenset[str]:
    """The flags a binary defines, from absl's --helpxml (one process per binary)."""
    result = subprocess.run([sys.executable, *program[1:], "--helpxml"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    names = re.findall(r"<name>(\w+)</name>", result.stdout)
    assert names, f"{' '.join(program)} --helpxml printed no flags: {result.stderr[-500:]}"
    return frozenset(names)


def _check_config_argument(argument: str) -> str | None:
    name, _, value = argument.partition("=")
    if name == "--config":
        path = value.split(":")[0]
        return None if (ROOT / path).is_file() else f"config file {path} does not exist"
    node = default_config()
    for key in name[len("--config."):].split("."):
        if key not in node:
            return f"{name}: no such config field"
        node = node[key]
    return None


def _problems(words: list[str]) -> list[str]:
    program = _program(words)
    problems = _missing_files(words)
    if program is None or problems:
        return problems
    run, arguments = program
    defined = _flags_of(tuple(run))
    for argument in arguments:
        if not argument.startswith("--"):
            continue  # a subcommand such as `import`
        if argument.startswith("--config"):
            problem = _check_config_argument(argument)
            problems += [problem] if problem else []
            continue
        name = argument[2:].split("=")[0]
        if name not in defined and not (name.startswith("no") and name[2:] in defined):
            problems.append(f"{' '.join(run)} has no flag --{name}")
    return problems


def test_every_command_in_the_readme_and_docs_parses():
    commands = _documented_commands()
    programs = {tuple(p[0]) for _, w in commands if (p := _program(w))}
    assert len(programs) >= 5, programs  # the extraction found the binaries
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(_flags_of, sorted(programs)))  # the binaries' start-ups in parallel
    problems = [f"{doc}: {' '.join(words)}: {p}" for doc, words in commands
                for p in _problems(words)]
    assert not problems, "\n".join(problems)


def test_the_command_check_catches_a_wrong_flag_field_or_config():
    assert _problems(["python", "-m", "lm.train", "--config=configs/quickstart.py",
                      "--config.model.num_layers=2", "--workdir=x"]) == []
    assert _problems(["python", "-m", "lm.train", "--wrkdir=x"]) == [
        "python -m lm.train has no flag --wrkdir"]
    assert _problems(["python", "-m", "lm.train", "--config.model.num_layerz=2"]) == [
        "--config.model.num_layerz: no such config field"]
    assert _problems(["python", "-m", "lm.train", "--config=configs/nope.py"]) == [
        "config file configs/nope.py does not exist"]
    assert _problems(["scripts/launch_tpu.sh", "--name=x", "--", "python", "-m", "lm.train",
                      "--workdirr=gs://b/r"]) == ["python -m lm.train has no flag --workdirr"]
    assert _problems(["scripts/nope.sh", "x"]) == ["scripts/nope.sh does not exist"]


def test_pip_extras_named_in_the_docs_exist_in_setup_cfg():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    extras = set(setup["options.extras_require"])
    named = {extra for doc in DOCS for extra in re.findall(r'"\.\[(\w+)\]"', doc.read_text())}
    assert named and named <= extras, named - extras


def test_requirements_txt_lists_exactly_setup_cfg_install_requires():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    wanted = [r.strip() for r in setup["options"]["install_requires"].splitlines() if r.strip()]
    listed = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert listed == wanted


def test_config_reference_in_the_docs_is_generated_from_lm_config():
    text = (ROOT / "docs" / "training.md").read_text()
    assert config_reference.replace_in(text) == text, (
        "docs/training.md's config reference is stale: run python scripts/config_reference.py "
        "--write")


def test_every_config_field_has_a_meaning_in_its_comment():
    assert config_reference.missing_comments() == []


def _anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(doc):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"\w+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path) if path else doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
            if anchor not in {_anchor(h) for h in headings}:
                broken.append(target)
    assert not broken, broken


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text()) <= 12_500
