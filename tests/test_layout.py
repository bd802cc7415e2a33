"""Imports flow one way: config <- models <- weights <- pipeline <- {cli, server}; diffusion/ knows no models."""

import ast
from pathlib import Path

import plainsd

SRC = Path(plainsd.__file__).parent


def _imports(path: Path) -> set[str]:
    """Absolute names of the plainsd modules (and third-party packages) a file imports."""
    tree = ast.parse(path.read_text())
    package = ".".join(("plainsd",) + path.relative_to(SRC).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module)
    return out


def _files(sub: str):
    return sorted((SRC / sub).rglob("*.py")) if (SRC / sub).is_dir() else [SRC / sub]


def test_models_import_only_torch_and_config():
    for f in _files("models"):
        for name in _imports(f):
            assert name.split(".")[0] in ("torch", "plainsd", "__future__", "functools", "gzip", "html", "itertools", "os", "re",
                                          "unicodedata", "math"), (f, name)
            assert not name.startswith("plainsd.") or name.startswith(("plainsd.models", "plainsd.config")), (f, name)


def test_diffusion_never_imports_models():
    for f in _files("diffusion"):
        for name in _imports(f):
            assert not name.startswith(("plainsd.models", "plainsd.weights", "plainsd.pipeline")), (f, name)


def test_no_reference_library_is_imported_anywhere():
    for f in SRC.rglob("*.py"):
        for name in _imports(f):
            assert name.split(".")[0] not in ("diffusers", "transformers", "open_clip", "k_diffusion"), (f, name)


def test_weights_does_not_reach_up():
    for name in _imports(SRC / "weights.py"):
        assert not name.startswith(("plainsd.pipeline", "plainsd.cli", "plainsd.server")), name


# Declarative tables may run longer: the command line's argument parser.
LONG_TABLES = {("cli.py", "build_parser")}


def test_functions_are_a_screen_long():
    long = []
    for f in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80 and (f.relative_to(SRC).as_posix(), node.name) not in LONG_TABLES:
                    long.append(f"{f.relative_to(SRC)}:{node.name} ({lines} lines)")
    assert not long, f"functions over 80 lines: {', '.join(long)}"

