"""The documentation is checked: the site builds with ``mkdocs build --strict`` (a broken
link, a missing page or anchor, a page outside the nav fails), every command shown in a
``bash`` block of README.md and docs/ uses only flags its program's ``--help`` lists (a
renamed flag fails here), every Python block parses, its imports resolve and its keyword
arguments exist, the blocks marked ``<!-- docs-test: run -->`` run, and each command's
flags are all documented on its page."""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
RUN_MARKER = "<!-- docs-test: run -->"

# The project's commands, by how the docs call them, and the page that documents each flag.
SCRIPTS = {
    "run_gpt2": "scripts/run_gpt2.py",
    "prepare_data": "scripts/prepare_data.py",
    "report_metrics": "scripts/report_metrics.py",
    "evaluate_fairseq": "scripts/evaluate_fairseq.py",
    "export_fairseq_to_hf": "scripts/export_fairseq_to_hf.py",
    "demo": "scripts/demo.py",
    "benchmarks/run": "benchmarks/run.py",
    "benchmarks/triton_bench": "benchmarks/triton_bench.py",
    "score_generations": "scripts/score_generations.py",
    "compare": "scripts/compare.py",
    "benchmarks/contrastive_search": "benchmarks/contrastive_search.py",
    "benchmarks/large_vocab": "benchmarks/large_vocab.py",
}
CONSOLE_SCRIPTS = {
    "scalegrad-run-gpt2": "run_gpt2",
    "scalegrad-prepare-data": "prepare_data",
    "scalegrad-report": "report_metrics",
    "scalegrad-evaluate-fairseq": "evaluate_fairseq",
    "scalegrad-export-hf": "export_fairseq_to_hf",
    "scalegrad-score": "score_generations",
    "scalegrad-compare": "compare",
}
# The pages that together document each flag of a command (a flag documented on its own
# page, say docs/objectives.md, adds that page here).
FLAG_PAGES = {
    "run_gpt2": ("docs/gpt2-driver.md", "docs/objectives.md", "docs/contrastive-search.md",
                 "docs/metrics-2022.md"),
    "evaluate_fairseq": ("docs/fairseq.md", "docs/contrastive-search.md", "docs/metrics-2022.md"),
    "score_generations": ("docs/metrics-2022.md",),
    "compare": ("docs/compare.md",),
    "prepare_data": ("docs/data.md",),
    "report_metrics": ("docs/reports.md",),
    "export_fairseq_to_hf": ("docs/fairseq.md",),
    "benchmarks/run": ("docs/benchmarks.md",),
}
FAIRSEQ = {"fairseq-train", "fairseq-hydra-train", "fairseq-preprocess", "fairseq-generate"}
# Programs the docs show whose flags are not ours to check (installers, shell tools, the
# trackers' own commands); any other program in a bash block fails the test, so a new one
# is either checked or added here on purpose.
UNCHECKED = {"pip", "wget", "tar", "mkdir", "mv", "cp", "cd", "git", "tensorboard", "wandb",
             "for", "done", "time", "uninstall"}
WRAPPERS = {"time", "nice", "exec", "env"}
PYTHONS = re.compile(r"^(\S*/)?python(3(\.\d+)?)?$")


# --- reading the Markdown --------------------------------------------------------------

def code_blocks(path: Path):
    """(language, text, first line number, marked to run) of each fenced block."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not match:
            i += 1
            continue
        marked = i > 0 and lines[i - 1].strip() == RUN_MARKER
        start, body = i + 1, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(match.group(1)):])
            i += 1
        blocks.append((match.group(2), "\n".join(body), start + 1, marked))
        i += 1
    return blocks


def all_blocks(language: str):
    return [(path, text, line, marked) for path in PAGES
            for lang, text, line, marked in code_blocks(path) if lang == language]


def substitute_subshells(line: str) -> str:
    """``$(which fairseq-train)`` -> ``fairseq-train``; any other ``$(...)`` -> one word."""
    out, i = [], 0
    while i < len(line):
        if line.startswith("$(", i):
            depth, j = 1, i + 2
            while j < len(line) and depth:
                depth += {"(": 1, ")": -1}.get(line[j], 0)
                j += 1
            inner = line[i + 2:j - 1].strip()
            which = re.fullmatch(r"which\s+(\S+)", inner)
            out.append(which.group(1) if which else "SUBSHELL")
            i = j
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


def shell_commands(text: str):
    """Each simple command of a bash block as a token list, variables assigned in the
    block expanded, line continuations joined, comments dropped."""
    variables, commands = {}, []
    for line in text.replace("\\\n", " ").splitlines():
        line = substitute_subshells(line)
        line = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), line)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        command = []
        for token in list(lexer) + [";"]:
            if token in (";", "&&", "||", "|", "&"):
                if len(command) == 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", command[0]):
                    name, value = command[0].split("=", 1)
                    variables[name] = value
                elif command:
                    commands.append(command)
                command = []
            else:
                command.append(token)
    return commands


def program_of(command: list[str]):
    """(program key, its arguments), past wrappers, ``python``, ``torchrun`` and ``do``."""
    tokens = list(command)
    while tokens:
        head = tokens[0]
        if head in ("do", "then") or re.fullmatch(r"[A-Za-z_]\w*=.*", head):
            tokens.pop(0)
        elif head in WRAPPERS and len(tokens) > 1:
            tokens.pop(0)
            if head == "nice" and tokens[0] == "-n":
                del tokens[:2]
        elif PYTHONS.match(head):
            tokens.pop(0)
            if tokens and tokens[0] == "-m":
                return f"python -m {tokens[1]}", tokens[2:]
        elif head == "torchrun":  # its own flags, then the script
            tokens.pop(0)
            while tokens and not tokens[0].endswith(".py") and tokens[0] not in FAIRSEQ:
                tokens.pop(0)
        else:
            break
    if not tokens:
        return None, []
    head, args = tokens[0], tokens[1:]
    if head in CONSOLE_SCRIPTS:
        return CONSOLE_SCRIPTS[head], args
    if head.endswith(".py"):
        stem = head[:-3].lstrip("./")
        if stem.endswith("gpt2/run_gpt2"):  # scripts/run_gpt2.py or the copy's gpt2/run_gpt2.py
            return "run_gpt2", args
        key = stem.removeprefix("scripts/")
        return key, args
    if head == "bash" and args and args[0].endswith(".sh"):
        return "bash-script", args
    return head, args


def flags_of(args: list[str]) -> list[str]:
    flags = []
    for token in args:
        token = token.strip("[]")
        if re.match(r"^--?[A-Za-z]", token):
            flags.append(token.split("=", 1)[0])
    return flags


def doc_commands():
    """(where, program, arguments) of every command in every bash block."""
    found = []
    for path, text, line, _ in all_blocks("bash"):
        for command in shell_commands(text):
            program, args = program_of(command)
            if program is not None:
                found.append((f"{path.relative_to(REPO)}:{line}", program, args))
    return found


# --- the programs' --help ----------------------------------------------------------------

def help_flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text))


@functools.lru_cache(maxsize=None)
def script_help(key: str) -> str:
    result = subprocess.run([sys.executable, str(REPO / SCRIPTS[key]), "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{SCRIPTS[key]} --help failed:\n{result.stderr}"
    return result.stdout


def prefetch_script_help(keys) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(script_help, sorted(set(keys))))


def option_value(args: list[str], name: str):
    for i, token in enumerate(args):
        if token == name and i + 1 < len(args):
            return args[i + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


def fairseq_help_key(program: str, args: list[str]) -> tuple:
    """What fairseq's --help depends on: its components' options appear once they are named."""
    if program not in ("fairseq-train", "fairseq-generate"):
        return (program,)
    names = ("--task", "--arch", "--criterion", "--optimizer", "--lr-scheduler")
    return (program, *((name, option_value(args, name)) for name in names))


# fairseq-train's --help lists only its generic options (it exits before adding those of
# the task, model, criterion, optimizer and scheduler), so the options of fairseq's
# commands come from its own parsers, built as fairseq_cli's mains build them with this
# plugin loaded and the command line's components named; several keys in one process,
# so fairseq imports once.
FAIRSEQ_OPTIONS = r"""
import json, sys
from fairseq import options
user_dir, out = sys.argv[2], {}
for key in json.loads(sys.argv[1]):
    program, *components = key
    sys.argv = [program, "--user-dir", user_dir]  # get_parser loads --user-dir from sys.argv
    if program == "fairseq-preprocess":
        parser = options.get_preprocessing_parser()
    else:
        argv = ["DATA", "--user-dir", user_dir]
        for name, value in components:
            if name == "--arch" and value is None and program == "fairseq-train":
                value = "transformer_lm"  # a fragment (fairseq-train ... --flag): any model
            if value is not None:
                argv += [name, value]
        if program == "fairseq-train":
            parser = options.get_training_parser()
        else:
            parser = options.get_generation_parser()
        options.parse_args_and_arch(parser, input_args=argv, parse_known=True)  # adds them
    out[json.dumps(key)] = sorted(parser._option_string_actions)
print(json.dumps(out))
"""


def fairseq_options(keys) -> dict:
    keys = sorted(keys, key=str)
    result = subprocess.run([sys.executable, "-c", FAIRSEQ_OPTIONS, json.dumps(keys),
                             str(REPO / "scalegrad")], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = {tuple(tuple(c) if isinstance(c, list) else c for c in json.loads(k)): set(v)
             for k, v in json.loads(result.stdout.splitlines()[-1]).items()}
    assert all("--seed" in flags or "--destdir" in flags for flags in found.values())
    return found


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([\w-]+):", text, flags=re.M))


# --- the tests -----------------------------------------------------------------------------

def test_site_builds_strictly(tmp_path):
    """Broken links and anchors, missing pages, pages outside the nav: each fails the build."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                             "--site-dir", str(tmp_path / "site")],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "WARNING" not in result.stderr, result.stderr[-4000:]
    built = tmp_path / "site"
    assert (built / "index.html").is_file() and (built / "api" / "losses.html").is_file()
    # mkdocstrings rendered the docstrings (a signature, not a bare ::: line)
    api = (built / "api" / "losses.html").read_text(encoding="utf-8")
    assert "scalegrad_loss" in api and "ignore_index" in api and ":::" not in api
    # mkdocs_hooks.py: the front page is README.md, its links into docs/ made site links
    front = (built / "index.html").read_text(encoding="utf-8")
    links = re.findall(r'href="([^"]*)"', front)
    assert "make demo" in front and "gpt2-driver.html" in links
    assert not [link for link in links if link.startswith("docs/")]
    # mkdocs_hooks.py: the docstrings' reStructuredText roles render as plain code spans
    assert ":func:" not in api and ":mod:" not in api


def test_readme_links_resolve():
    """README.md is read on the forge, not in the site: its relative links must exist too."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)  # rows of pages still to come
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#")[0] for t in targets if not re.match(r"^[a-z]+://", t) and t.split("#")[0]]
    assert local, "no relative links found"
    missing = [t for t in local if not (REPO / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_stays_a_front_page():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines: move the details into docs/"
    # the Quickstart's two commands, which .ci/run and the Makefile rely on
    assert "make demo   # sets up .venv/" in "\n".join(lines)
    assert "make test   # sets up .venv/" in "\n".join(lines)


def test_command_parsing_sees_flags():
    """The collector itself: continuations, variables, loops, wrappers and subshells."""
    text = ('COMMON="--user-dir scalegrad --task t"\n'
            "for m in a b; do\n  nice -n 5 python scripts/run_gpt2.py --mode train \\\n"
            "      --gamma=0.2 [--resume]  # a comment --not-a-flag\ndone\n"
            "fairseq-train data $COMMON --arch x && torchrun --nproc_per_node 2 "
            "scripts/run_gpt2.py --seed 1\n$(which fairseq-train) --cpu\n")
    found = [program_of(c) for c in shell_commands(text)]
    found = [(p, flags_of(a)) for p, a in found if p not in (None, "for", "done")]
    assert found == [("run_gpt2", ["--mode", "--gamma", "--resume"]),
                     ("fairseq-train", ["--user-dir", "--task", "--arch"]),
                     ("run_gpt2", ["--seed"]),
                     ("fairseq-train", ["--cpu"])]


def test_every_command_flag_is_in_its_help():
    """Each flag of each shown command of ours is one its --help lists (renames fail)."""
    commands = [c for c in doc_commands() if c[1] not in FAIRSEQ]
    prefetch_script_help(p for _, p, _ in commands if p in SCRIPTS)
    checked, problems = 0, []
    for where, program, args in commands:
        if program in SCRIPTS:
            known = help_flags(script_help(program))
            for flag in flags_of(args):
                checked += 1
                if flag not in known:
                    problems.append(f"{where}: {SCRIPTS[program]} has no flag {flag}")
        elif program == "make":
            targets = [a for a in args if not a.startswith("-")]
            problems += [f"{where}: the Makefile has no target {t!r}" for t in targets
                         if t not in make_targets()]
        elif program == "bash-script":
            if not (REPO / args[0]).is_file():
                problems.append(f"{where}: no script {args[0]}")
        elif program.startswith("python -m "):
            if program != "python -m pip":
                problems.append(f"{where}: unchecked module command {program}")
        elif program not in UNCHECKED:
            problems.append(f"{where}: unknown program {program!r}: check it in tests/test_docs.py "
                            "or add it to UNCHECKED")
    assert not problems, "\n".join(problems)
    assert checked > 100, f"only {checked} flags found: is the collector broken?"


@pytest.mark.slow
def test_every_fairseq_command_flag_is_in_its_help():
    """fairseq-train / -generate / -preprocess commands: each flag is one fairseq's parser
    accepts with this plugin loaded and the command's own task, architecture, criterion,
    optimizer and scheduler (so the criterion's --gamma and the task's options count);
    fairseq-hydra-train's --config-name must be a shipped config."""
    pytest.importorskip("fairseq")
    commands = [c for c in doc_commands() if c[1] in FAIRSEQ]
    accepted = fairseq_options({fairseq_help_key(p, a) for _, p, a in commands
                                if p != "fairseq-hydra-train"})
    checked, problems = 0, []
    for where, program, args in commands:
        if program == "fairseq-hydra-train":
            config_dir, name = option_value(args, "--config-dir"), option_value(args, "--config-name")
            if name is not None and not (REPO / config_dir / f"{name}.yaml").is_file():
                problems.append(f"{where}: no config {config_dir}/{name}.yaml")
            continue
        known = accepted[fairseq_help_key(program, args)]
        for flag in flags_of(args):
            checked += 1
            if flag not in known:
                problems.append(f"{where}: {program} has no flag {flag} "
                                f"(with {fairseq_help_key(program, args)[1:]})")
    assert not problems, "\n".join(problems)
    assert checked > 50, f"only {checked} fairseq flags found"


@pytest.mark.parametrize("program", sorted(FLAG_PAGES))
def test_every_flag_is_documented(program):
    """Each flag of the command's --help is named on its page (a new flag needs its line)."""
    page = "\n".join((REPO / p).read_text(encoding="utf-8") for p in FLAG_PAGES[program])
    named = set(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", page))
    text = script_help(program)
    # Every alias of an option is on one line of the help's options list; one name per
    # option is enough.
    options = text.split("options:", 1)[1] if "options:" in text else text
    missing = []
    for line in options.splitlines():
        if not re.match(r"^  -", line):  # an option's line, not its wrapped description
            continue
        names = re.findall(r"(?:^|, )(--[A-Za-z][\w-]*)", line.strip())
        if names and names[0] != "--help" and not set(names) & named:
            missing.append(" / ".join(names))
    assert not missing, f"{' + '.join(FLAG_PAGES[program])} do not mention: {missing}"


def python_examples():
    return [pytest.param(text, marked, id=f"{path.relative_to(REPO)}:{line}")
            for path, text, line, marked in all_blocks("python")]


def imported_names(tree: ast.AST) -> dict[str, str]:
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}:{alias.name}"
    return names


@pytest.mark.parametrize("text, marked", python_examples())
def test_python_example(text, marked):
    """Parses; each ``from X import Y`` resolves; each call of an imported name passes only
    keywords its signature takes; blocks marked to run run, offline."""
    tree = ast.parse(text)
    imported = imported_names(tree)
    objects = {}
    for name, target in imported.items():
        module, attr = target.split(":")
        objects[name] = getattr(importlib.import_module(module), attr)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in objects:
            signature = inspect.signature(objects[node.func.id])
            params = signature.parameters
            if any(p.kind is p.VAR_KEYWORD for p in params.values()):
                continue
            unknown = [k.arg for k in node.keywords if k.arg is not None and k.arg not in params]
            assert not unknown, f"{node.func.id}() takes no keyword {unknown}"
    if marked:
        import torch

        torch.manual_seed(0)
        namespace = {"__name__": "docs_example"}
        exec(compile(tree, "<docs example>", "exec"), namespace)
        loss = namespace.get("loss")
        assert loss is not None and torch.isfinite(loss), "a run example ends with a finite loss"
