"""What an installed cylsm promises: one version, type information for every public name."""
from __future__ import annotations

import ast
import importlib.metadata
import os
from pathlib import Path
from types import ModuleType

import pytest

import cylsm
from cylsm import _select

HERE = Path(__file__).parent
PACKAGE = Path(cylsm.__file__).parent


def test_version_is_the_distribution_version() -> None:
    # cylsm/_version.py is the one source: pyproject.toml reads it (setuptools dynamic version).
    assert cylsm.__version__ == importlib.metadata.version("cylsm")


def test_typing_marker_and_stubs_are_installed() -> None:
    assert (PACKAGE / "py.typed").is_file()
    for name in _select.LEVELS:
        assert (PACKAGE / f"_kernels_{name}.pyi").is_file()


def test_every_public_name_is_typed_and_used_in_the_typed_example() -> None:
    example = ast.parse((HERE / "typing_example.py").read_text())
    used = {node.attr for node in ast.walk(example)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "cylsm"}
    assert set(cylsm.__all__) <= used, f"not exercised by mypy --strict: {set(cylsm.__all__) - used}"
    api = ast.parse((PACKAGE / "_api.py").read_text())
    for fn in (n for n in api.body if isinstance(n, ast.FunctionDef) and n.name in cylsm.__all__):
        args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
        untyped = [a.arg for a in args if a.annotation is None]
        assert fn.returns is not None and not untyped, f"{fn.name}: untyped {untyped}"


def stub_names(module: str) -> set[str]:
    """Names a kernel stub declares, following its ``from cylsm._kernels_x import *``."""
    tree = ast.parse((PACKAGE / f"{module}.pyi").read_text())
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    names |= {n.target.id for n in tree.body
              if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    for n in tree.body:
        if isinstance(n, ast.ImportFrom) and n.module and [a.name for a in n.names] == ["*"]:
            names |= stub_names(n.module.rsplit(".", 1)[1])
    return names


@pytest.mark.skipif(bool(os.environ.get("CYLSM_NO_EXTENSIONS")), reason="no compiled kernels")
@pytest.mark.parametrize("name", _select.COMPILED_NAMES)
def test_stub_declares_every_public_kernel_name(name: str) -> None:
    kernels = _select.load(name)
    declared = stub_names(kernels.__name__.rsplit(".", 1)[1])
    public = {n for n in dir(kernels)
              if not n.startswith("_") and not isinstance(getattr(kernels, n), ModuleType)}
    assert public <= declared, f"missing from the stub: {public - declared}"
