"""Every Python package under the source roots is listed in pyproject.toml, and none shadows the stdlib."""

import importlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_is_listed_for_non_editable_installs():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(init.parent.relative_to(ROOT / "operator").parts)
             for init in (ROOT / "operator").rglob("__init__.py")}
    found |= {"loraplex.sidecar" + "".join(f".{p}" for p in init.parent.relative_to(ROOT / "sidecar").parts)
              for init in (ROOT / "sidecar").rglob("__init__.py")}
    assert found == listed


def test_operator_folder_does_not_shadow_the_standard_library():
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert importlib.import_module("operator").__file__.endswith("operator.py")
