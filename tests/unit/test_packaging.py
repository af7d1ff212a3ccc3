"""setuptools finds packages under src/ by their __init__.py: a folder of modules without one would be left out
of a non-editable install (the image) while an editable install still imports it."""

from pathlib import Path

import setuptools

SRC = Path(__file__).resolve().parents[2] / "src"


def test_every_folder_of_modules_is_a_package_setuptools_finds():
    folders = {path.parent for path in (SRC / "loraplex").rglob("*.py") if "__pycache__" not in path.parts}
    found = set(setuptools.find_packages(str(SRC)))
    assert {".".join(folder.relative_to(SRC).parts) for folder in folders} <= found
    assert "loraplex.sidecar" in found and "loraplex.formats" in found
