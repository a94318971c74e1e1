"""The documentation stays true: the generated config reference matches dis_dist/config.py, every
relative link and anchor resolves, the README stays short, and every command a code block names
exists and answers ``--help`` with the flags the docs give it."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from dis_dist.config import RunConfig
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 10_240  # bytes: a page a newcomer reads in five minutes


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "tools" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def leaf_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every leaf key of the config, ``section.key``, found from the dataclasses themselves."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


# -- the generated config reference ------------------------------------------------------------

def test_docs_pages_exist():
    names = {p.name for p in PAGES}
    assert {"README.md", "configuration.md", "data.md", "distributed.md", "cluster.md", "evaluation.md",
            "kernels.md", "benchmarks.md", "trust.md", "architecture.md", "demo.md"} <= names


def test_config_reference_is_up_to_date():
    gen = _load_generator()
    text = gen.DOC.read_text()
    assert gen.BEGIN in text and gen.END in text
    assert gen.updated(text, gen.DOC) == text, "docs/configuration.md is stale: run python tools/gen_config_docs.py"
    assert gen.main(["--check"]) == 0


def test_config_reference_check_fails_on_a_stale_file(tmp_path, capsys):
    gen = _load_generator()
    stale = tmp_path / "configuration.md"
    text = gen.DOC.read_text()
    row = "| `train.steps` | int | `400000` | optimiser steps |"
    assert row in text
    stale.write_text(text.replace(row, "| `train.steps` | int | `1` | steps |"))
    assert gen.main(["--check", "--file", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert gen.main(["--file", str(stale)]) == 0  # rewrites it
    assert stale.read_text() == text


def test_every_config_key_is_documented():
    text = (ROOT / "docs" / "configuration.md").read_text()
    begin, end = "<!-- BEGIN GENERATED", "<!-- END GENERATED -->"
    assert text.count(begin) == text.count(end) == 1
    reference = text[text.index(begin):text.index(end)]
    rows = {m.group(1) for m in re.finditer(r"^\| `([\w.]+)` \|", reference, flags=re.M)}
    keys = leaf_keys()
    assert len(keys) == len(set(keys)) > 70
    missing = [k for k in keys if k not in rows]
    assert not missing, f"keys missing from docs/configuration.md: {missing}"
    assert rows - set(keys) == set(), f"documented keys that do not exist: {rows - set(keys)}"


def test_every_config_key_has_a_description():
    gen = _load_generator()
    keys, sections = gen.collect()
    assert [k.name for k in keys] == leaf_keys()
    assert all(k.description for k in keys), [k.name for k in keys if not k.description]
    assert set(sections) == {f.name for f in dataclasses.fields(RunConfig)} - {"run_dir"}
    by_name = {k.name: k for k in keys}
    assert by_name["train.steps"].default == "`400000`"
    assert by_name["optim.betas"].default == "`[0.9, 0.999]`"
    assert by_name["data.verify"].type == "`size`, `sha256` or `none`"
    # a description continued on the comment line below its field
    assert by_name["sample.batch_size"].description.endswith("free memory (at most 256)")


# -- links ---------------------------------------------------------------------------------------

def _prose(text: str) -> str:
    """The page without its fenced code blocks and inline code."""
    text = re.sub(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", _prose_keep_inline(page.read_text()), flags=re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def _prose_keep_inline(text: str) -> str:
    return re.sub(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", "", text, flags=re.M | re.S)


def relative_links(page: Path) -> list[str]:
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _prose(page.read_text()))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto:


def test_slugs_follow_github():
    assert slug("Context parallelism: the `cp` axis") == "context-parallelism-the-cp-axis"
    assert slug("DiS-H/2 on one machine") == "dis-h2-on-one-machine"
    assert slug("Reproducing the paper's FID") == "reproducing-the-papers-fid"
    assert slug("bench_cp.py: context parallelism") == "bench_cppy-context-parallelism"


def dead_links(page: Path) -> list[str]:
    dead = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            dead.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            dead.append(f"{target}: no heading #{anchor} in {file.name}")
    return dead


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_dead_relative_links(page):
    links = relative_links(page)
    assert len(links) >= 2
    assert page == README or "../README.md" in links, "a docs page links back to README.md"
    dead = dead_links(page)
    assert not dead, f"{page.name}: dead links: {dead}"


def test_the_link_checker_sees_dead_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## A `code` heading: yes\n\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md#a-code-heading-yes) [top](#page) ![img](other.md)\n"
                    "[gone](missing.md) [bad](other.md#not-a-heading) [web](https://example.com/x)\n"
                    "`[in code](missing2.md)`\n```\n[in a block](missing3.md)\n```\n")
    assert relative_links(page) == ["other.md#a-code-heading-yes", "#page", "other.md", "missing.md",
                                    "other.md#not-a-heading"]
    assert dead_links(page) == ["missing.md: no such file",
                                "other.md#not-a-heading: no heading #not-a-heading in other.md"]


def test_readme_links_every_docs_page_and_embeds_the_demo_samples():
    links = {t.partition("#")[0] for t in relative_links(README)}
    pages = {f"docs/{p.name}" for p in PAGES if p != README}
    assert pages <= links, f"pages the README does not link: {pages - links}"
    assert "docs/demo_samples.png" in links and (ROOT / "docs" / "demo_samples.png").stat().st_size > 1000


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT} (move detail to docs/)"


def test_docs_pages_start_with_a_summary():
    for page in PAGES[1:]:
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# "), page.name
        first = next(i for i, line in enumerate(lines[1:], 1) if line.strip())
        assert not lines[first].startswith(("#", "|", "```", "-")), f"{page.name}: no summary paragraph"


# -- the newcomer's path: commands in code blocks -----------------------------------------------

PYTHON_NAMES = re.compile(r"(^|/)python3?$")
SHELL_BREAK = re.compile(r"^[|&;<>()]+$")


@dataclasses.dataclass(frozen=True)
class Command:
    kind: str  # "script" (tools/X.py), "module" (dis_dist.X), "console" (dis-train), "file", "make", "tensorboard"
    target: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}"


def code_blocks(page: Path) -> list[str]:
    return [m.group(2) for m in re.finditer(r"^ {0,3}(```|~~~)[^\n]*\n(.*?)^ {0,3}\1", page.read_text(),
                                            flags=re.M | re.S)]


def _tokens(line: str) -> list[str]:
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        return list(lexer)
    except ValueError:  # unbalanced quotes in program output shown in a block
        return line.split()


def commands_in(block: str) -> list[tuple[Command, list[str]]]:
    """(command, its arguments) for every entry point the block runs."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"^\s*\$ ", "", line)
        tokens = _tokens(line)
        i = 0
        while i < len(tokens):
            tok, rest = tokens[i], tokens[i + 1:]
            args = []
            for t in rest:
                if SHELL_BREAK.match(t):
                    break
                args.append(t)
            command = None
            if PYTHON_NAMES.search(tok) and args[:1] == ["-m"] and len(args) > 1 and args[1].startswith("dis_dist"):
                command, args = Command("module", args[1].rstrip(",.;:")), args[2:]
            elif PYTHON_NAMES.search(tok) and args and re.fullmatch(r"tools/\w+\.py", args[0]):
                command, args = Command("script", args[0]), args[1:]
            elif tok == "torchrun":
                for j, t in enumerate(args):
                    if t == "-m" and j + 1 < len(args) and args[j + 1].startswith("dis_dist"):
                        command, args = Command("module", args[j + 1].rstrip(",.;:")), args[j + 2:]
                        break
                    if re.fullmatch(r"tools/\w+\.py", t):
                        command, args = Command("script", t), args[j + 1:]
                        break
            elif tok == "dis-train":
                command = Command("console", tok)
            elif tok == "sbatch":
                script = next((t for t in args if re.fullmatch(r"slurm/[\w.-]+\.sbatch", t)), None)
                command, args = (Command("file", script), []) if script else (None, [])
            elif re.fullmatch(r"tools/[\w.-]+\.sh", tok):
                command, args = Command("file", tok), []
            elif tok == "make":
                for t in args:
                    if not t.startswith("-") and "=" not in t:
                        found.append((Command("make", t), []))
                args = []
            elif tok == "tensorboard":
                command = Command("tensorboard", tok)
            if command is not None:
                found.append((command, args))
            i += 1
    return found


def collect_commands() -> dict[Command, set[str]]:
    """Every command the code blocks of README.md and docs/*.md name, and the long flags given to it."""
    out: dict[Command, set[str]] = {}
    for page in PAGES:
        for block in code_blocks(page):
            for command, args in commands_in(block):
                flags = {a.lstrip("[").split("=")[0] for a in args if a.lstrip("[").startswith("--")}
                out.setdefault(command, set()).update(flags)
    return out


COMMANDS = collect_commands()
RUNNABLE = sorted((c for c in COMMANDS if c.kind in ("script", "module", "console", "tensorboard")), key=str)
FILES = sorted((c for c in COMMANDS if c.kind in ("file", "make")), key=str)


def test_the_collector_finds_the_newcomer_path():
    names = {str(c) for c in COMMANDS}
    assert {"make:demo", "make:test", "make:test-fast", "script:tools/encode_latents.py", "script:tools/sample.py",
            "script:tools/fid.py", "script:tools/export_checkpoint.py", "module:dis_dist.train",
            "module:dis_dist.plan", "console:dis-train", "file:slurm/train_dis_h.sbatch",
            "file:slurm/encode_latents.sbatch", "tensorboard:tensorboard"} <= names
    assert {"--input", "--output", "--vae", "--resolution"} <= COMMANDS[Command("script", "tools/encode_latents.py")]
    parsed = commands_in("torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d \\\n"
                         "    -m dis_dist.train --config c.yaml train.steps=1 | tee log  # note\n")
    assert parsed == [(Command("module", "dis_dist.train"), ["--config", "c.yaml", "train.steps=1"])]


@pytest.mark.parametrize("command", FILES, ids=str)
def test_named_scripts_and_make_targets_exist(command):
    if command.kind == "file":
        assert (ROOT / command.target).is_file(), f"{command.target} does not exist"
    else:
        makefile = (ROOT / "Makefile").read_text()
        targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", makefile, flags=re.M))
        assert command.target in targets, f"make {command.target}: no such target in the Makefile"


@pytest.mark.slow
@pytest.mark.parametrize("command", RUNNABLE, ids=str)
def test_named_commands_answer_help(command):
    """Each entry point once, with --help: it runs, prints its usage, and knows every flag the docs
    give it."""
    bin_dir = Path(sys.executable).parent
    if command.kind == "script":
        argv = [sys.executable, command.target]
    elif command.kind == "module":
        argv = [sys.executable, "-m", command.target]
    else:
        exe = shutil.which(command.target, path=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        require(exe is not None, f"{command.target} on PATH (pip install -e .)")
        argv = [exe]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([*argv, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{command} --help exited {result.returncode}:\n{result.stderr[-2000:]}"
    assert "usage:" in result.stdout.lower(), result.stdout[:500]
    unknown = sorted(f for f in COMMANDS[command]
                     if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", result.stdout))
    assert not unknown, f"{command}: flags in the docs that --help does not list: {unknown}"
