#!/usr/bin/env python
"""Render the config key reference of docs/configuration.md from the config dataclasses.

Every leaf key of ``dis_dist.config.RunConfig`` becomes a row ``section.key | type | default |
description``, one table per section, in the order of the dataclasses. Types and defaults come
from the dataclasses themselves; descriptions are the fields' comments in dis_dist/config.py,
read from the source with ``ast`` and ``tokenize``: the comment on the field's line, continued by
the comment lines directly below it (or, for a field without one, the comment lines directly
above it). A field without a description is an error, so every key stays documented.

Only the part of the page between the two marker lines is rewritten; the hand-written text
around it is kept.

    python tools/gen_config_docs.py            # rewrite docs/configuration.md
    python tools/gen_config_docs.py --check    # exit 1 if it is out of date (CI, tests/test_docs.py)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import re
import sys
import tokenize
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dis_dist import config as config_module  # noqa: E402

CONFIG_SOURCE = ROOT / "dis_dist" / "config.py"
DOC = ROOT / "docs" / "configuration.md"
BEGIN = "<!-- BEGIN GENERATED: python tools/gen_config_docs.py -->"
END = "<!-- END GENERATED -->"
NOTE = ("<!-- Do not edit by hand: the descriptions are the fields' comments in dis_dist/config.py; "
        "rerun python tools/gen_config_docs.py after changing them. -->")


@dataclasses.dataclass
class Key:
    name: str  # dotted: "model.name", or "run_dir" at the top level
    type: str
    default: str
    description: str


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the field's description, for every annotated class field."""
    comments: dict[int, str] = {}  # line -> the comment's text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()

    def comment_only(n: int) -> bool:  # 1-based line n holds nothing but a comment
        return 1 <= n <= len(lines) and lines[n - 1].lstrip().startswith("#")

    out: dict[tuple[str, str], str] = {}
    for cls in ast.walk(ast.parse(source)):
        if not isinstance(cls, ast.ClassDef):
            continue
        fields = [s for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
        taken: set[int] = set()  # comment lines already given to a field as continuation
        for stmt in fields:
            end = stmt.end_lineno or stmt.lineno
            parts = [comments[n] for n in range(stmt.lineno, end + 1) if n in comments and not comment_only(n)]
            if parts:
                n = end + 1
                while comment_only(n):
                    parts.append(comments[n])
                    taken.add(n)
                    n += 1
            else:
                n, above = stmt.lineno - 1, []
                while comment_only(n) and n not in taken:
                    above.insert(0, comments[n])
                    n -= 1
                parts = above
            out[(cls.name, stmt.target.id)] = " ".join(p for p in parts if p)
    return out


def type_name(hint: typing.Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        choices = [f"`{c}`" for c in typing.get_args(hint)]
        return choices[0] if len(choices) == 1 else ", ".join(choices[:-1]) + " or " + choices[-1]
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return f"list[{type_name(item)}]"
    return getattr(hint, "__name__", str(hint))


def default_text(value: typing.Any) -> str:
    """The default as one would write it in a YAML config."""
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return '`""`' if value == "" else f"`{value}`"
    if isinstance(value, list):
        return "`[" + ", ".join(default_text(v).strip("`") for v in value) + "]`"
    return f"`{value!r}`"


def collect(cls: type = config_module.RunConfig, prefix: str = "",
            comments: dict[tuple[str, str], str] | None = None) -> tuple[list[Key], dict[str, str]]:
    """Every leaf key under ``cls`` (depth first, in field order), and each section's description."""
    if comments is None:
        comments = field_comments(CONFIG_SOURCE.read_text())
    hints = typing.get_type_hints(cls)
    instance = cls()
    keys: list[Key] = []
    sections: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        name, hint = prefix + f.name, hints[f.name]
        description = comments.get((cls.__name__, f.name), "")
        if dataclasses.is_dataclass(hint):
            sections[name] = description
            sub_keys, sub_sections = collect(hint, name + ".", comments)
            keys += sub_keys
            sections.update(sub_sections)
        else:
            keys.append(Key(name, type_name(hint), default_text(getattr(instance, f.name)), description))
    return keys, sections


def markdown(text: str, known: list[str]) -> str:
    """A comment as table-cell Markdown: pipes escaped; config keys (with a ``=value``),
    $VARIABLES, repository paths and TensorBoard tags as code; docs/X.md as a link (from docs/)."""
    text = text.replace("|", "\\|")
    names = "|".join(re.escape(k) for k in sorted(known, key=len, reverse=True))
    text = re.sub(rf"(?<![\w.`/])((?:{names})(?:=[\w.-]+)?)(?![\w`]|\.\w)", r"`\1`", text)
    text = re.sub(r"(?<![\w`])(\$[A-Z][A-Z0-9_]*)", r"`\1`", text)
    text = re.sub(r"(?<![\w`/.])((?:\.cache|configs|tools|data|train|eval)/[\w./*-]*[\w*])", r"`\1`", text)
    return re.sub(r"(?<![\w/`])docs/([\w-]+\.md)", r"[\1](\1)", text)


def render() -> str:
    """The generated block, markers included."""
    keys, sections = collect()
    missing = [k.name for k in keys if not k.description] + [s for s, d in sections.items() if not d]
    if missing:
        raise SystemExit(f"{CONFIG_SOURCE.relative_to(ROOT)}: no comment describes {', '.join(missing)}; "
                         f"add one on the field's line")
    known = [k.name for k in keys]
    groups: dict[str, list[Key]] = {"": []}
    for section in sections:
        groups[section] = []
    for key in keys:
        groups[key.name.rpartition(".")[0]].append(key)
    out = [BEGIN, NOTE, ""]
    for section, members in groups.items():
        if not members:
            continue
        out.append(f"### {section or 'Top level'}")
        out.append("")
        if section:
            out += [markdown(sections[section][:1].upper() + sections[section][1:], known) + ".", ""]
        out += ["| key | type | default | description |", "|---|---|---|---|"]
        for k in members:
            out.append(f"| `{k.name}` | {k.type} | {k.default} | {markdown(k.description, known)} |")
        out.append("")
    out.append(END)
    return "\n".join(out)


def updated(text: str, path: Path) -> str:
    """``text`` (the page) with its generated block replaced by the current one."""
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        raise SystemExit(f"{path}: the markers {BEGIN!r} and {END!r} are missing; put them where the reference goes")
    return text[:start] + render() + text[stop + len(END):]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/gen_config_docs.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true",
                   help="do not write; exit 1 if the file differs from what would be generated")
    p.add_argument("--file", type=Path, default=DOC, help="the page to update (default: docs/configuration.md)")
    args = p.parse_args(argv)
    text = args.file.read_text()
    new = updated(text, args.file)
    if args.check:
        if new != text:
            print(f"{args.file} is out of date with dis_dist/config.py: run python tools/gen_config_docs.py",
                  file=sys.stderr)
            return 1
        print(f"{args.file} is up to date")
        return 0
    if new != text:
        args.file.write_text(new)
        print(f"wrote {args.file}")
    else:
        print(f"{args.file} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
