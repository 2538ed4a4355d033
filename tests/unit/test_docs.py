"""The documentation cannot rot: every command line and run-config key that README.md and docs/*.md show still works.

- Command lines in fenced code blocks (``bash`` blocks, and ``$ `` lines in example output) that start with
  ``ssl3d``, ``python launch/pretrain.py``, ``torchrun``, ``deepspeed`` or ``sbatch launch/slurm/*.sbatch`` go
  through the real parsers: ssl3d's own (``ssl3d.cli.main`` and ``pretrain_main``, which also takes the reference's
  flags), torchrun's and the DeepSpeed launcher's; what a launcher or an sbatch script passes on to
  ``launch/pretrain.py`` goes through ssl3d's. A flag must be spelled as the parser spells it (argparse would also
  take a prefix of a longer flag, so a renamed flag could otherwise pass). Pre-training lines that name no file
  missing from a checkout are resolved in-process with ``--dry-run``.
- Command lines and flags in inline code (often shortened: ``ssl3d export``, ``--resume auto``) must name flags
  that exist.
- Every run-config key named in inline code (``train.precision``), in a ``--set key=value`` override or in a JSON
  example of a run config exists in the config tree; JSON examples of a run config load through the real loader.
- Every relative link points at a file that exists, and at a heading of it where it names one.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import re
import shlex
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from ssl3d.cli import main, pretrain_main
from ssl3d.config import Config, ConfigError, load_config
from ssl3d.reference import reference_page
from ssl3d.strategies.ds_config import Preset

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = ("model", "data", "ssl", "optim", "train", "finetune")
PRETRAIN_SCRIPT = "launch/pretrain.py"
# Options of other programs that the pages name on their own in inline code; no parser for them here.
FOREIGN_FLAGS = {"--signal": "sbatch", "--requeue": "sbatch"}
# Files a command may name that a checkout has (the dry runs see them); any other path is a placeholder.
SANDBOX_LINKS = ("ds_configs", "launch", "bench", "configs")
PATHLIKE = re.compile(r"/|\.(json|pt|nii|gz|png|txt|mha|mhd|nrrd|sbatch|py)$")
# A dotted run-config key, not a file name (model_swinvit.pt, dataset.json) or a path (data/lidc).
KEY = re.compile(rf"(?<![\w./-])({'|'.join(SECTIONS)})((?:\.[A-Za-z_]\w*)+)(?![\w/-]|\.\w)")
FILE_SUFFIXES = {"json", "pt", "py", "md", "png", "txt", "gz", "nii", "sbatch"}


def rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


# ---------------------------------------------------------------------------------------------------------
# Reading the pages


@dataclass(frozen=True)
class Snippet:
    """A piece of a page: a command line (continuations joined), an inline code span or a JSON block."""

    page: Path
    line: int
    text: str

    def where(self) -> str:
        return f"{rel(self.page)}:{self.line}"


def fences(page: Path) -> Iterator[tuple[str, int, list[str]]]:
    """(language, line number of the first body line, body lines) of every fenced code block."""
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"\s*```(\S*)", lines[i])
        if not m:
            i += 1
            continue
        indent = len(lines[i]) - len(lines[i].lstrip())
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith("```"):
            j += 1
        yield m.group(1), i + 2, [line[indent:] for line in lines[i + 1 : j]]
        i = j + 1


def prose(page: Path) -> str:
    """The page with fenced blocks blanked out (line numbers kept)."""
    lines = page.read_text().splitlines()
    for _, first, body in fences(page):
        for k in range(first - 2, first + len(body)):
            lines[k] = ""
    return "\n".join(lines)


def fenced_commands(page: Path) -> list[Snippet]:
    """Shell lines of ``bash`` blocks and ``$ `` lines of other blocks, with ``\\`` continuations joined."""
    out = []
    for lang, first, body in fences(page):
        shell = lang in ("bash", "sh", "shell", "console")
        k = 0
        while k < len(body):
            start, text = k, body[k]
            while text.endswith("\\") and k + 1 < len(body):
                k += 1
                text = text[:-1] + " " + body[k].strip()
            k += 1
            text = text.strip()
            if not shell:
                if not text.startswith("$ "):
                    continue
                text = text[2:]
            if text and not text.startswith("#"):
                out.append(Snippet(page, first + start, text))
    return out


def inline_spans(page: Path) -> list[Snippet]:
    """Inline code spans outside fenced blocks (a span may continue on the next line)."""
    text = prose(page)
    return [
        Snippet(page, text.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
        for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text)
    ]


def json_blocks(page: Path) -> list[Snippet]:
    return [Snippet(page, first, "\n".join(body)) for lang, first, body in fences(page) if lang == "json"]


# ---------------------------------------------------------------------------------------------------------
# The real parsers


class _Parsed(Exception):
    pass


class DocError(Exception):
    pass


def real_parse(entry: Callable[[list[str]], object], argv: list[str], name: str | None = None) -> argparse.Namespace:
    """Run ``entry(argv)`` until its parser has parsed ``argv`` and stop there, before the program does anything:
    the namespace. A parse error raises DocError with argparse's own message (its program named ``name``)."""
    seen: dict[str, object] = {}
    original = argparse.ArgumentParser.parse_args

    def spy(self, args=None, namespace=None):
        if seen:
            return original(self, args, namespace)
        seen["args"] = original(self, args, namespace)
        raise _Parsed

    err = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", spy), contextlib.redirect_stderr(err):
        try:
            entry(argv)
        except _Parsed:
            return seen["args"]
        except SystemExit:
            line = err.getvalue().strip().splitlines()[-1]
            raise DocError(f"{name}: error: {line.split(': error: ', 1)[-1]}" if name else line) from None
    raise AssertionError(f"{entry.__name__} returned without parsing its arguments")


def parser_of(entry: Callable[[list[str]], object]) -> argparse.ArgumentParser:
    """The parser ``entry`` builds, without parsing anything."""
    seen: list[argparse.ArgumentParser] = []

    def spy(self, args=None, namespace=None):
        seen.append(self)
        raise _Parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", spy), contextlib.suppress(_Parsed):
        entry([])
    return seen[0]


def torchrun_entry(argv: list[str]) -> object:
    from torch.distributed.run import get_args_parser

    return get_args_parser().parse_args(argv)


def deepspeed_entry(argv: list[str]) -> object:
    from deepspeed.launcher.runner import parse_args

    return parse_args(argv)


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def leaf_parsers(parser: argparse.ArgumentParser, argv: list[str]) -> list[argparse.ArgumentParser]:
    """The sub-command parsers ``argv`` selects (``estimate|plan`` in a page selects both)."""
    sub = subparsers(parser)
    if not sub or not argv or argv[0].startswith("-"):
        return [parser]
    names = argv[0].split("|")
    unknown = [n for n in names if n not in sub]
    if unknown:
        raise DocError(f"unknown sub-command {unknown[0]!r} of {parser.prog!r} (has: {', '.join(sub)})")
    return [leaf for n in names for leaf in leaf_parsers(sub[n], argv[1:])]


def all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for sub in subparsers(parser).values():
        yield from all_parsers(sub)


def check_spelling(parsers: list[argparse.ArgumentParser], argv: list[str], name: str | None = None) -> None:
    """Every ``--flag`` in argv is an option string of each parser, exactly."""
    for token in argv:
        if not token.startswith("--") or token == "--":
            continue
        flag = token.split("=", 1)[0]
        for p in parsers:
            known = list(p._option_string_actions)
            if flag not in known:
                close = difflib.get_close_matches(flag, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise DocError(f"{name or p.prog}: unknown flag {flag}{hint}")


# ---------------------------------------------------------------------------------------------------------
# Command lines


@dataclass
class Command:
    kind: str  # ssl3d, pretrain.py, torchrun, deepspeed, sbatch, script
    argv: list[str]  # the arguments of the program named by kind
    pretrain_argv: list[str] | None = None  # what reaches launch/pretrain.py (launchers, sbatch scripts)


def split_commands(text: str) -> list[list[str]]:
    """A shell line -> the token lists of its commands (``&&``, ``||``, ``;`` and ``|`` separate them), each
    without leading ``NAME=value`` environment settings; ``# comments`` dropped."""
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:
        tokens = text.split()
    out: list[list[str]] = [[]]
    for t in tokens:
        if t in ("&&", "||", ";", "|"):
            out.append([])
        else:
            out[-1].append(t)
    for cmd in out:
        while cmd and re.match(r"[A-Za-z_]\w*=", cmd[0]):
            cmd.pop(0)
    return [c for c in out if c]


def classify(tokens: list[str]) -> Command | None:
    """The command a token list runs, or None for a program this check does not know (pip, kill, tensorboard)."""
    prog, args = tokens[0], tokens[1:]
    if prog == "ssl3d":
        return Command("ssl3d", args)
    if prog in ("python", "python3") and args and args[0].endswith(".py"):
        if args[0] == PRETRAIN_SCRIPT:
            return Command("pretrain.py", args[1:], args[1:])
        return Command("script", args)
    if prog in ("torchrun", "deepspeed"):
        return Command(prog, args)
    if prog == "sbatch":
        script = next((i for i, a in enumerate(args) if a.endswith(".sbatch")), None)
        if script is not None:
            # The scripts run launch/pretrain.py --resume auto "$@".
            return Command("sbatch", args[: script + 1], ["--resume", "auto", *args[script + 1 :]])
    return None


def check_command(cmd: Command, complete: bool) -> None:
    """Parse a command with the real parsers (``complete``), or check only the spelling of its flags (a shortened
    line such as ``ssl3d pretrain ... --resume auto``); fills in ``pretrain_argv`` for a launcher."""
    if cmd.kind == "script":
        if not (ROOT / cmd.argv[0]).is_file():
            raise DocError(f"python {cmd.argv[0]}: no such file")
        return
    if cmd.kind == "sbatch":
        script = cmd.argv[-1]
        if not (ROOT / script).is_file():
            raise DocError(f"sbatch {script}: no such file")
    if cmd.kind in ("torchrun", "deepspeed"):
        entry = torchrun_entry if cmd.kind == "torchrun" else deepspeed_entry
        parser = parser_of(entry)
        # The launcher's own options end at the training script (its first positional).
        script = next((i for i, a in enumerate(cmd.argv) if a.endswith(".py")), len(cmd.argv))
        check_spelling([parser], cmd.argv[:script], cmd.kind)
        if complete:
            args = real_parse(entry, cmd.argv, cmd.kind)
            script_name = args.training_script if cmd.kind == "torchrun" else args.user_script
            script_args = args.training_script_args if cmd.kind == "torchrun" else args.user_args
        elif script < len(cmd.argv):
            script_name, script_args = cmd.argv[script], cmd.argv[script + 1 :]
        else:
            return
        if script_name != PRETRAIN_SCRIPT:
            raise DocError(f"{cmd.kind} runs {script_name}, not {PRETRAIN_SCRIPT}")
        cmd.pretrain_argv = list(script_args)
    if cmd.kind == "ssl3d":
        leaves = leaf_parsers(parser_of(main), cmd.argv)
        check_spelling(leaves, cmd.argv)
        if complete:
            real_parse(main, cmd.argv)
    elif cmd.pretrain_argv is not None:
        check_spelling([parser_of(pretrain_main)], cmd.pretrain_argv, PRETRAIN_SCRIPT)
        if complete:
            real_parse(pretrain_main, cmd.pretrain_argv, PRETRAIN_SCRIPT)


def commands_in(snippet: Snippet) -> Iterator[Command]:
    for tokens in split_commands(snippet.text):
        cmd = classify(tokens)
        if cmd is not None:
            yield cmd


def overrides(argv: list[str]) -> list[str]:
    """The ``key=value`` of every ``--set`` in an argument list."""
    out = []
    for i, t in enumerate(argv):
        if t == "--set" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif t.startswith("--set="):
            out.append(t[len("--set=") :])
    return out


# ---------------------------------------------------------------------------------------------------------
# Config keys


def config_tree() -> dict:
    return Config().to_dict()


def key_problem(key: str, tree: dict) -> str | None:
    node: object = tree
    done = []
    for part in key.split("."):
        if not isinstance(node, dict):
            return f"{key}: {'.'.join(done)} has no keys below it"
        if part not in node:
            close = difflib.get_close_matches(part, list(node), n=1)
            hint = f"; did you mean {'.'.join([*done, close[0]])}?" if close else ""
            return f"{key}: not a run-config key{hint}"
        node = node[part]
        done.append(part)
    return None


def keys_in(text: str) -> list[str]:
    out = []
    for m in KEY.finditer(text):
        key = m.group(1) + m.group(2)
        if key.rsplit(".", 1)[-1] not in FILE_SUFFIXES:
            out.append(key)
    return out


def json_fragment(text: str) -> dict | None:
    """A JSON object, or a ``"key": value`` fragment of one, as a dict; None when the text is neither."""
    for candidate in (text, "{" + text + "}"):
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def tree_keys(tree: dict, prefix: str = "") -> Iterator[str]:
    for k, v in tree.items():
        yield f"{prefix}{k}"
        if isinstance(v, dict):
            yield from tree_keys(v, f"{prefix}{k}.")


# ---------------------------------------------------------------------------------------------------------
# The checks


@dataclass
class Report:
    problems: list[str]
    counts: Counter
    dry_runs: list[tuple[Snippet, str, list[str]]]  # (where, ssl3d or pretrain.py, the arguments)


def is_placeholder(token: str, sandbox: Path) -> bool:
    value = token.split("=", 1)[1] if token.startswith("--") and "=" in token else token
    return bool(PATHLIKE.search(value)) and not (sandbox / value).exists()


def scan_commands(sandbox: Path) -> Report:
    problems: list[str] = []
    counts: Counter = Counter()
    dry_runs: list[tuple[Snippet, str, list[str]]] = []
    for page in PAGES:
        for snippet, fenced in [(s, True) for s in fenced_commands(page)] + [(s, False) for s in inline_spans(page)]:
            complete = fenced and "..." not in snippet.text
            for cmd in commands_in(snippet):
                try:
                    check_command(cmd, complete)
                except DocError as exc:
                    problems.append(f"{snippet.where()}: {snippet.text}\n    {exc}")
                    continue
                counts[cmd.kind if fenced else f"{cmd.kind} (inline)"] += 1
                argv = cmd.argv if cmd.pretrain_argv is None else cmd.pretrain_argv
                if overrides(argv):
                    try:  # the real loader: each key exists and each value has the right type and range
                        load_config(None, overrides(argv), check_files=False)
                    except ConfigError as exc:
                        problems += [f"{snippet.where()}: {snippet.text}\n    --set {line}" for line in exc.problems]
                pretrain = (cmd.kind == "ssl3d" and cmd.argv[:1] == ["pretrain"]) or cmd.kind == "pretrain.py"
                if complete and pretrain and not any(is_placeholder(t, sandbox) for t in argv):
                    dry_runs.append((snippet, cmd.kind, argv if cmd.kind == "pretrain.py" else argv[1:]))
            if not fenced and snippet.text.startswith("--"):
                counts["flag (inline)"] += 1
                flag_problem = check_bare_flags(snippet.text.split())
                if flag_problem:
                    problems.append(f"{snippet.where()}: `{snippet.text}`: {flag_problem}")
    return Report(problems, counts, dry_runs)


_KNOWN_FLAGS: set[str] = set()


def known_flags() -> set[str]:
    if not _KNOWN_FLAGS:
        parsers = [*all_parsers(parser_of(main)), parser_of(pretrain_main)]
        parsers += [parser_of(torchrun_entry), parser_of(deepspeed_entry)]
        _KNOWN_FLAGS.update(f for p in parsers for f in p._option_string_actions)
    return _KNOWN_FLAGS


def check_bare_flags(tokens: list[str]) -> str | None:
    """Flags named on their own (``--resume auto``, ``--task finetune|probe``) exist in some parser shown here."""
    for token in tokens:
        if not token.startswith("--"):
            continue
        flag = token.split("=", 1)[0]
        if flag not in known_flags() and flag not in FOREIGN_FLAGS:
            close = difflib.get_close_matches(flag, sorted(known_flags()), n=1)
            return f"no command takes {flag}" + (f" (did you mean {close[0]}?)" if close else "")
    return None


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder with the checkout's presets and scripts: relative paths in the pages resolve, and whatever
    a dry run would read from (or look for in) runs/ is this folder's, not the checkout's."""
    root = tmp_path_factory.mktemp("docs")
    for name in SANDBOX_LINKS:
        (root / name).symlink_to(ROOT / name, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def report(sandbox: Path) -> Report:
    return scan_commands(sandbox)


def test_pages_exist():
    assert (ROOT / "docs").is_dir() and len(PAGES) > 1


def test_every_command_line_parses(report: Report):
    print("command lines checked:", dict(sorted(report.counts.items())))
    if report.problems:
        pytest.fail("command lines in the docs that no longer parse:\n" + "\n".join(report.problems), pytrace=False)
    # The extraction found what the pages show (an empty scan would pass anything).
    for kind in ("ssl3d", "pretrain.py", "torchrun", "deepspeed", "sbatch"):
        assert report.counts[kind] > 0, (kind, report.counts)


def test_pretraining_lines_resolve_with_dry_run(report: Report, sandbox: Path, monkeypatch: pytest.MonkeyPatch):
    """Pre-training lines that name no placeholder file resolve to a checked config (``--dry-run``, in-process,
    on the CPU on any machine)."""
    monkeypatch.chdir(sandbox)
    seen: set[tuple[str, ...]] = set()
    problems = []
    for snippet, kind, argv in report.dry_runs:
        if tuple(argv) in seen:
            continue
        seen.add(tuple(argv))
        out, err = io.StringIO(), io.StringIO()
        args = [*argv, '--set=train.device="cpu"', "--dry-run"]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            start = time.perf_counter()
            rc = pretrain_main(args) if kind == "pretrain.py" else main(["pretrain", *args])
            took = time.perf_counter() - start
        print(f"dry run {snippet.where()} ({took:.2f} s): {' '.join(argv)}")
        if rc != 0:
            problems.append(f"{snippet.where()}: {snippet.text}\n    exit {rc}: {err.getvalue().strip()}")
        else:
            json.loads(out.getvalue()[out.getvalue().index("{") :])
    if problems:
        pytest.fail("command lines in the docs that --dry-run refuses:\n" + "\n".join(problems), pytrace=False)
    assert len(seen) >= 2, report.dry_runs  # the demo and the reference's command line at least


def test_every_config_key_named_exists():
    tree = config_tree()
    problems, named = [], 0
    for page in PAGES:
        for snippet in inline_spans(page):
            for key in keys_in(snippet.text):
                named += 1
                problem = key_problem(key, tree)
                if problem:
                    problems.append(f"{snippet.where()}: `{snippet.text}`: {problem}")
            fragment = json_fragment(snippet.text)
            if fragment and set(fragment) <= set(SECTIONS):
                for key in tree_keys(fragment):
                    named += 1
                    problem = key_problem(key, tree)
                    if problem:
                        problems.append(f"{snippet.where()}: `{snippet.text}`: {problem}")
    print(f"config keys checked: {named}")
    if problems:
        pytest.fail("config keys in the docs that the run config lacks:\n" + "\n".join(problems), pytrace=False)
    assert named > 20


def test_run_config_examples_load(tmp_path: Path):
    """A JSON block whose top-level keys are run-config sections is a run config (or part of one): it loads
    through the real loader (unknown keys and wrong types are errors there)."""
    loaded = 0
    problems = []
    for page in PAGES:
        for block in json_blocks(page):
            tree = json_fragment(block.text)
            if tree is None:
                problems.append(f"{block.where()}: a json block that is not JSON")
                continue
            if not set(tree) <= set(SECTIONS):
                continue  # a strategy preset's section
            path = tmp_path / "run.json"
            path.write_text(json.dumps(tree))
            try:
                load_config(path, check_files=False)
            except ConfigError as exc:
                problems += [f"{block.where()}: {line}" for line in exc.problems]
            loaded += 1
    if problems:
        pytest.fail("run-config examples in the docs that do not load:\n" + "\n".join(problems), pytrace=False)
    assert loaded >= 2


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", prose(page), flags=re.M)}


def test_relative_links_resolve():
    problems = []
    for page in PAGES:
        text = prose(page)
        for m in re.finditer(r"\]\(([^)\s]+)\)", text):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            line = text.count("\n", 0, m.start()) + 1
            if not dest.exists():
                problems.append(f"{rel(page)}:{line}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{rel(page)}:{line}: {target}: no heading with that anchor")
    if problems:
        pytest.fail("links in the docs that point nowhere:\n" + "\n".join(problems), pytrace=False)


def test_config_reference_is_generated_from_the_models():
    """docs/config.md is the run config's field documentation; a key added, renamed or re-documented in
    ssl3d/config.py without regenerating the page (``python -m ssl3d.reference > docs/config.md``) fails here."""
    page = (ROOT / "docs" / "config.md").read_text()
    assert page == reference_page(), "docs/config.md is stale: python -m ssl3d.reference > docs/config.md"
    for section, info in Config.model_fields.items():
        for name in getattr(info.annotation, "model_fields", {}):
            assert f"`{section}.{name}`" in page
    for name in Preset.model_fields:
        assert f"| `{name}` |" in page
