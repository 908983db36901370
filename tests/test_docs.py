"""Docs that cannot drift (issue #13): the README names every command and option of the `etl`
CLI and no command or option that does not exist; its Layout section names every module of
`etl/` and every top-level directory, grouped by layer; every `docs/design.md §N` a file cites
is a section of docs/design.md.

Everything is read from the real sources (the click command tree, the files on disk), so a new
command, option, module or directory fails here until the docs name it. No database needed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import click
import pytest

from etl.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DESIGN = ROOT / "docs" / "design.md"

# -- the command tree -----------------------------------------------------------------------


def _commands(cmd: click.Command = cli, path: tuple[str, ...] = ("etl",)
              ) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """(path, command) for the group and every visible command under it, depth first."""
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            if not sub.hidden:
                yield from _commands(sub, (*path, name))


def _options(cmd: click.Command) -> list[click.Option]:
    return [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]


def _long_names(cmd: click.Command) -> list[str]:
    return [name for p in _options(cmd) for name in (*p.opts, *p.secondary_opts)
            if name.startswith("--")]


COMMANDS = list(_commands())
LEAVES = [path for path, cmd in COMMANDS if not isinstance(cmd, click.Group)]


def test_the_command_tree_is_what_this_test_walks() -> None:
    # A guard for the walk itself: it sees nested groups and their options.
    paths = [" ".join(path) for path, _ in COMMANDS]
    assert {"etl", "etl sync", "etl db", "etl db upgrade"} <= set(paths)
    assert "--ids-file" in _long_names(dict(COMMANDS)[("etl", "sync")])
    assert "--log-format" in _long_names(cli)


# -- the README, cut into blocks --------------------------------------------------------------


def _blocks(text: str) -> list[str]:
    """Paragraphs, list items, table rows and lines of fenced code, each a block of its own:
    an option documented "beside its command" is in a block that names the command."""
    blocks: list[str] = []
    current: list[str] = []
    fenced = False

    def close() -> None:
        if current:
            blocks.append("\n".join(current))
            current.clear()

    for line in text.splitlines():
        if line.startswith("```"):
            close()
            fenced = not fenced
        elif fenced or line.startswith("|"):
            close()
            blocks.append(line)
        elif not line.strip() or line.startswith("#"):
            close()
        elif line.startswith("- "):
            close()
            current.append(line)
        else:
            current.append(line)
    close()
    return blocks


def _names_command(block: str, path: tuple[str, ...]) -> bool:
    if len(path) == 1:  # the group: its options are written `etl -v ...`, `etl --log-format`
        return re.search(r"(?<![\w./-])etl -", block) is not None
    return re.search(r"(?<![\w./-])" + re.escape(" ".join(path)) + r"(?![\w-])",
                     block) is not None


def _has_option(block: str, name: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(name) + r"(?![\w-])", block) is not None


def _section(text: str, heading: str) -> str:
    """The text under a markdown heading, up to the next heading of the same or a higher
    level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    start = lines.index(heading)  # ValueError: the heading is gone
    end = next((i for i in range(start + 1, len(lines))
                if re.match(rf"#{{1,{level}}} ", lines[i])), len(lines))
    return "\n".join(lines[start + 1:end])


def test_every_command_has_a_row_in_the_readme_commands_table() -> None:
    table = _section(README.read_text(encoding="utf-8"), "### Commands")
    first_cells = [row.split("|")[1] for row in table.splitlines() if row.startswith("| `")]
    missing = [" ".join(path) for path in LEAVES
               if not any(_names_command(cell, path) for cell in first_cells)]
    assert missing == [], f"README's Commands table has no row for: {missing}"


def test_every_option_is_in_the_readme_beside_its_command() -> None:
    blocks = _blocks(README.read_text(encoding="utf-8"))
    missing = []
    for path, cmd in COMMANDS:
        near = [b for b in blocks if _names_command(b, path)]
        missing += [f"{' '.join(path)} {name}" for name in _long_names(cmd)
                    if not any(_has_option(b, name) for b in near)]
    assert missing == [], ("README does not name these options in a paragraph, table row or "
                           f"code line that names their command: {missing}")


# -- and nothing the CLI does not have ----------------------------------------------------------

_SHELL_STOP = ("|", "&", ";", ">", "<", "#", ")", "2>")


# Fenced code in these languages holds shell lines; SQL (`CREATE ROLE etl`) and Python do not.
_SHELL_FENCES = ("", "sh", "bash", "shell", "console", "cron", "text")


def _invocations(text: str) -> Iterator[str]:
    """The text after `etl` in every code span and every shell code line of a markdown file."""
    spans: list[str] = []
    prose: list[str] = []
    fence: str | None = None
    for line in text.splitlines():
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
        elif fence is not None:
            if fence in _SHELL_FENCES:
                spans.append(line)
        else:
            prose.append(line)
    for block in _blocks("\n".join(prose)):  # a code span never crosses a block
        spans += re.findall(r"`([^`]+)`", block)
    for span in spans:
        for m in re.finditer(r"(?<![\w./$'\"-])etl(?=[ \t\n])", span):
            before = span[:m.start()]
            # A command: first in its span or line, after environment assignments, or after
            # `uv run`, `python -m`, `&&`, `;`, `|`. Not `--conn-login etl`, a value.
            if re.fullmatch(r"(?:\s*[A-Z_][A-Z0-9_]*=\S*)*\s*", before.rsplit("\n", 1)[-1]) or \
                    re.search(r"(?:\buv run|\bpython3? -m|&&|;|\|)\s*$", before):
                yield span[m.end():]


def _option_of(cmd: click.Command, name: str) -> click.Option | None:
    for p in _options(cmd):
        if name in (*p.opts, *p.secondary_opts):
            return p
    return None


def _check_invocation(rest: str) -> list[str]:
    """What an `etl ...` invocation names that the CLI lacks."""
    cmd: click.Command = cli
    problems: list[str] = []
    wants_value = False
    for raw in rest.split():
        if raw.startswith(_SHELL_STOP) or "$(" in raw or raw == "\\":
            break
        tok = raw.strip("[](),'\"")
        if not tok or tok == "..." or tok.startswith("{{"):
            wants_value = False if tok.startswith("{{") else wants_value
            continue
        if wants_value:
            wants_value = False
            continue
        if tok.startswith("--"):
            name = tok.split("=", 1)[0]
            if name == "--help":
                continue
            opt = _option_of(cmd, name)
            if opt is None:
                problems.append(f"etl {rest.strip()!r}: {cmd.name} has no option {name}")
                break
            wants_value = not (opt.is_flag or opt.count) and "=" not in tok
        elif tok.startswith("-") and len(tok) > 1:
            letters = tok[1:]
            for i, letter in enumerate(letters):
                opt = _option_of(cmd, "-" + letter)
                if opt is None and letter != "h":
                    problems.append(f"etl {rest.strip()!r}: {cmd.name} has no option -{letter}")
                    return problems
                if opt is not None and not (opt.is_flag or opt.count):
                    wants_value = i == len(letters) - 1  # -x VALUE, or -xVALUE
                    break
        elif isinstance(cmd, click.Group):
            sub = cmd.commands.get(tok)
            if sub is None:
                problems.append(f"etl {rest.strip()!r}: no command {tok!r}")
                break
            cmd = sub
        # else: an argument or a placeholder (PATH, N, ids.txt)
    return problems


DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_name_no_command_or_option_the_cli_lacks(doc: Path) -> None:
    problems = [problem for rest in _invocations(doc.read_text(encoding="utf-8"))
                for problem in _check_invocation(rest)]
    assert problems == []


def test_the_invocation_check_catches_drift() -> None:
    assert _check_invocation(" sync --ids-file - --json --skip-loaded") == []
    assert _check_invocation(" -vv --log-format json sync --num-shards 4") == []
    assert _check_invocation(" failures [--run RUN_ID] [--warnings]") == []
    assert _check_invocation(" sync --ids-file ids.txt --frobnicate")
    assert _check_invocation(" db downgrade")
    assert _check_invocation(" runs --warnings")  # an option of another command
    assert list(_invocations("`COMMUBO_BASE_URL=x uv run etl sync --json`")) == [" sync --json"]
    assert list(_invocations("`airflow connections add --conn-login etl --port 1`")) == []


# -- the Layout section ---------------------------------------------------------------------------

LAYERS = ["Faces", "Pipeline", "Foundations", "Stand-ins"]
# Where some modules must be, whatever else moves: the layers' anchors.
ANCHORS = {
    "Faces": ["cli.py", "demo.py", *(p.name for p in (ROOT / "etl").glob("airflow*.py"))],
    "Pipeline": ["sync.py", "extract.py", "transform.py", "load.py"],
    "Foundations": ["config.py", "schema.py", "db.py", "runs.py", "errors.py"],
}


def _layout() -> str:
    return _section(README.read_text(encoding="utf-8"), "### Layout")


def _layers() -> dict[str, list[str]]:
    """Layer name -> the etl/ paths its list item names, from items `- **Layer** ...`."""
    items = re.split(r"\n(?=- )", _layout())
    layers: dict[str, list[str]] = {}
    for item in items:
        m = re.match(r"- \*\*([^*]+)\*\*", item.strip())
        if m:
            layers[m.group(1)] = re.findall(r"`(etl/[\w/]+(?:\.py)?)`", item)
    return layers


def _modules() -> list[str]:
    """etl/*.py (but the empty __init__.py) and package directories inside etl/."""
    etl = ROOT / "etl"
    files = [f"etl/{p.name}" for p in etl.glob("*.py") if p.name != "__init__.py"]
    packages = [f"etl/{p.parent.name}/" for p in etl.glob("*/__init__.py")]
    return sorted(files + packages)


def _top_level_dirs() -> list[str]:
    """The repository's top-level directories: what git tracks, or without git (an sdist),
    what is there and not ignored."""
    try:
        tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                                 check=True, timeout=30).stdout.decode().split("\0")
    except (OSError, subprocess.SubprocessError):
        tracked = []
    if tracked and tracked != [""]:
        return sorted({f.split("/", 1)[0] for f in tracked if "/" in f})
    ignored = [line.strip().rstrip("/") for line in
               (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.startswith("#")]
    return sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name != ".git"
                  and not any(fnmatch(p.name, pattern) for pattern in ignored))


def test_layout_names_every_module_and_directory() -> None:
    layout = _layout()
    named = {path for paths in _layers().values() for path in paths}
    assert [m for m in _modules() if m not in named] == [], "modules missing from README Layout"
    missing_dirs = [d for d in _top_level_dirs() if f"`{d}/`" not in layout]
    assert missing_dirs == [], "top-level directories missing from README Layout"


def test_layout_names_only_what_exists() -> None:
    named = {path for paths in _layers().values() for path in paths}
    assert sorted(p for p in named if not (ROOT / p).exists()) == []


def test_layout_is_grouped_by_layer() -> None:
    layers = _layers()
    assert list(layers) == LAYERS
    seen: dict[str, str] = {}
    for layer, paths in layers.items():
        for path in paths:
            assert path not in seen, f"{path} is in {seen[path]} and in {layer}"
            seen[path] = layer
    for layer, names in ANCHORS.items():
        assert [n for n in names if f"etl/{n}" not in layers[layer]] == [], layer


# -- alembic.ini's logging sections: live for `alembic`, never inside `etl` -----------------------


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "COMMUBO_"))}
    env["ETL_DATABASE_URL"] = f"sqlite:///{tmp_path / 'warehouse.db'}"
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_alembic_from_a_checkout_logs_as_alembic_ini_says(tmp_path: Path) -> None:
    # README (Schema changes) runs `alembic` from a checkout: migrations/env.py applies
    # alembic.ini's logging sections then, so Alembic says what it runs.
    proc = _run(tmp_path, "-m", "alembic", "upgrade", "head")
    assert proc.returncode == 0, proc.stderr
    assert "INFO  [alembic.runtime.migration] Running upgrade  -> 0001" in proc.stderr


def test_etl_db_upgrade_keeps_its_own_logging(tmp_path: Path) -> None:
    # In-process migrations must not replace etl's handler: with --log-format json every
    # line on stderr stays a JSON object.
    proc = _run(tmp_path, "-m", "etl", "-v", "--log-format", "json", "db", "upgrade")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and all(json.loads(line)["level"] for line in lines)


# -- docs/design.md: its sections and who cites them -----------------------------------------------

_NUMBER = r"\d+(?:\.\d+)*"


def _design_sections() -> dict[str, str]:
    """Section number -> heading title, for `## N. Title` and `### N.M Title`."""
    sections = {}
    for m in re.finditer(r"^#{2,4} (" + _NUMBER + r")\.? (.+)$", DESIGN.read_text(
            encoding="utf-8"), re.M):
        sections[m.group(1)] = m.group(2)
    return sections


def _design_anchors() -> set[str]:
    return set(re.findall(r'<a id="([^"]+)"></a>', DESIGN.read_text(encoding="utf-8")))


def test_design_sections_are_numbered_in_order_and_anchored() -> None:
    text = DESIGN.read_text(encoding="utf-8")
    numbers = list(_design_sections())
    assert numbers[:6] == ["1", "1.1", "1.2", "1.3", "1.4", "1.5"]
    assert len(numbers) == len(set(numbers))
    tops = [int(n) for n in numbers if "." not in n]
    assert tops == list(range(1, len(tops) + 1))
    # Each numbered heading has the anchor #sN right above it, which links can rely on.
    for number in numbers:
        assert re.search(rf'<a id="s{re.escape(number)}"></a>\n#{{2,4}} {re.escape(number)}\b',
                         text), f"§{number} has no anchor s{number} above its heading"


_CITED_FILES = ["etl", "tests", "benchmarks", "migrations", "examples"]
_CITATION = re.compile(r"design\.md((?:[\s#]*(?:,|and)?[\s#]*§" + _NUMBER + r")+)")
_LINK = re.compile(r"design\.md#([\w.-]+)")


def _citing_files() -> list[Path]:
    files = [p for d in _CITED_FILES for p in (ROOT / d).rglob("*.py")]
    files += [README, ROOT / "config.example.toml", ROOT / "alembic.ini",
              *(ROOT / "docs").glob("*.md")]
    return sorted(p for p in files if p.is_file() and ".venv" not in p.parts)


def test_design_citations_point_at_sections_that_exist() -> None:
    sections, anchors = _design_sections(), _design_anchors()
    bad = []
    for path in _citing_files():
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(ROOT)
        for m in _CITATION.finditer(text):
            bad += [f"{where}: §{n}" for n in re.findall(_NUMBER, m.group(1))
                    if n not in sections]
        bad += [f"{where}: #{a}" for a in _LINK.findall(text) if a not in anchors]
    # design.md's own cross-references
    bad += [f"design.md: §{n}" for n in re.findall(r"§(" + _NUMBER + ")",
                                                    DESIGN.read_text(encoding="utf-8"))
            if n not in sections]
    assert bad == []


def test_the_citation_pattern_reads_lists() -> None:
    found = [re.findall(_NUMBER, m.group(1)) for m in _CITATION.finditer(
        "(docs/design.md §1, §3 and §5) and docs/design.md §3.4 says; see design.md\n# §2")]
    assert found == [["1", "3", "5"], ["3.4"], ["2"]]


def test_nothing_cites_the_contract_outside_the_repository() -> None:
    this = Path(__file__).resolve()
    found = []
    for d in ["etl", "tests", "benchmarks", "migrations", "examples", "docs"]:
        for path in sorted((ROOT / d).rglob("*")):
            if path.suffix not in (".py", ".md") or path.resolve() == this:
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if re.search(r"\bSPEC\b|SPEC\.md|shared/SPEC", line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == []
