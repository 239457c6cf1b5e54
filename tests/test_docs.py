"""The documents stay true to the code: every command in the README parses, every module is on the map.

A README command that no longer parses (a renamed option, a removed subcommand) or a module missing from
``docs/architecture.md`` is a broken promise to the next reader; these tests fail on either.
"""
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from cora.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
DOCS = ("README.md", "docs/api.md", "docs/method.md", "docs/architecture.md", "docs/serving.md", "bench/README.md")

README_MAX_LINES = 160
FIRST_SCREEN_LINES = 80  # install, run, test, shared folder, Python, serve and results all fit here


def _code_block_lines(text: str, languages=("bash", "sh")) -> list[str]:
    """The lines of the fenced code blocks in ``languages``, comments stripped, continuations joined."""
    lines, inside = [], False
    for raw in text.splitlines():
        fence = raw.strip().startswith("```")
        if fence:
            inside = (not inside) and raw.strip()[3:].strip() in languages
            continue
        if inside:
            lines.append(raw)
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip()]


def _commands(text: str) -> list[str]:
    """Each simple command of the code blocks (``a && b`` is two)."""
    return [part.strip() for line in _code_block_lines(text) for part in line.split("&&") if part.strip()]


def _cora_argv(command: str) -> list[str] | None:
    """``python -m cora ARGS`` or ``cora ARGS`` -> ARGS; anything else -> None."""
    words = shlex.split(command)
    if words[:3] == ["python", "-m", "cora"]:
        return words[3:]
    if words[:1] == ["cora"]:
        return words[1:]
    return None


def test_readme_has_cli_commands():
    """The parser below must have something to check (guards against a regex that finds nothing)."""
    argvs = [argv for argv in map(_cora_argv, _commands(README.read_text())) if argv is not None]
    assert len(argvs) >= 4
    assert {argv[0] for argv in argvs} >= {"quantize", "serve", "eval"}


@pytest.mark.parametrize("command", [c for c in _commands(README.read_text()) if _cora_argv(c) is not None])
def test_readme_cli_command_parses(command):
    """The README's ``python -m cora ...`` lines parse with today's parser, and their subcommand has --help."""
    argv = _cora_argv(command)
    parser = build_parser()
    parser.parse_args(argv)  # argparse exits (SystemExit 2) on an unknown option or a bad value
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([argv[0], "--help"])
    assert exit_info.value.code == 0


def test_readme_pip_extras_exist():
    """``pip install -e ".[x]"`` names only extras that pyproject.toml declares."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = re.findall(r'pip install -e "\.\[(\w+)\]"', README.read_text())
    assert named, "the README should show how to install an extra"
    assert set(named) <= set(extras), set(named) - set(extras)


def test_readme_size():
    text = README.read_text().splitlines()
    assert len(text) <= README_MAX_LINES
    first_screen = "\n".join(text[:FIRST_SCREEN_LINES])
    for must in ("pip install -e .", "python -m cora quantize", "python -m pytest", "shared", "cora.convert",
                 "cora serve", "| float |"):
        assert must in first_screen, f"{must!r} is not on the README's first screen"


def _modules(package: str) -> list[str]:
    """Python modules of ``package`` relative to it (``serve.py``, ``experiments/``-level kept as files)."""
    base = ROOT / package
    return sorted(str(p.relative_to(base)) for p in base.rglob("*.py")
                  if p.name != "__init__.py" and p.name != "__main__.py" and "__pycache__" not in p.parts)


@pytest.mark.parametrize("package", ["cora", "cora_kernels"])
def test_every_module_is_on_the_architecture_map(package):
    text = ARCHITECTURE.read_text()
    missing = []
    for module in _modules(package):
        name = Path(module).name
        if f"`{name}`" not in text and f"`{module}`" not in text and f"`{Path(name).stem}`" not in text:
            missing.append(module)
    assert not missing, f"modules not in docs/architecture.md: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    path = ROOT / doc
    if not path.exists():
        pytest.fail(f"{doc} is linked from the README but missing")
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
        assert (path.parent / target).exists(), f"{doc} links to {target}, which does not exist"
