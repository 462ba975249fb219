"""The built wheel holds every sub-package under its mapped name (README.md, "Development", layout: methods/ kernels/ cli/ ->
latentkit.methods / .kernels / .cli) and the `latentkit` console script.

An editable install maps whole folders, so a sub-package missing from the wheel only shows up after
`pip install .`; this test catches it. The source tree is walked, so future sub-packages are covered. The
wheel is built from a copy of the tree in tmp_path, so no build/ or *.egg-info is left in the repo (and a
build running alongside other work in the repo cannot collide with it).
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAPPED = {
    "latentkit": "latentkit",
    "methods": "latentkit/methods",
    "kernels": "latentkit/kernels",
    "cli": "latentkit/cli",
}
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}


def source_files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.rglob(pattern) if not SKIP_DIRS & set(p.relative_to(root).parts))


def wheel_name(tree: Path, path: Path) -> str:
    """Source path (in `tree`) -> its path inside the wheel."""
    folder, *rest = path.relative_to(tree).parts
    return "/".join([MAPPED[folder], *rest])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, zipfile.ZipFile]:
    root = tmp_path_factory.mktemp("wheel")
    tree = root / "src"
    shutil.copytree(
        REPO,
        tree,
        ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "runs", ".venv", *SKIP_DIRS, "*.pyc"
        ),
    )
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--disable-pip-version-check",
        "-w",
        str(root / "dist"),
        str(tree),
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"wheel build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    (wheel,) = (root / "dist").glob("latentkit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        yield tree, archive


@pytest.mark.slow
def test_every_package_is_in_the_wheel(built):
    tree, archive = built
    names = set(archive.namelist())
    packages = [init for folder in MAPPED for init in source_files(tree / folder, "__init__.py")]
    assert any("methods" in p.parts for p in packages) and len(packages) >= 5, packages
    missing = [wheel_name(tree, p) for p in packages if wheel_name(tree, p) not in names]
    assert not missing, f"packages missing from the wheel: {missing}"
    modules = [p for folder in MAPPED for p in source_files(tree / folder, "*.py")]
    missing = [wheel_name(tree, p) for p in modules if wheel_name(tree, p) not in names]
    assert not missing, f"modules missing from the wheel: {missing}"
    assert "latentkit/py.typed" in names


@pytest.mark.slow
def test_every_folder_with_modules_is_a_package(built):
    """A folder of .py files without __init__.py imports in an editable install but is left out of the wheel."""
    tree, _ = built
    loose = sorted(
        {
            p.parent.relative_to(tree)
            for folder in MAPPED
            for p in source_files(tree / folder, "*.py")
            if not (p.parent / "__init__.py").is_file()
        }
    )
    assert not loose, f"folders with modules but no __init__.py (not packaged): {loose}"


@pytest.mark.slow
def test_console_script_entry_point(built):
    _, archive = built
    (entry_points,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(archive.read(entry_points).decode())
    assert parser["console_scripts"]["latentkit"].strip() == "latentkit.cli.app:main"
    assert {name: value.strip() for name, value in parser["latentkit.methods"].items()} == {
        "sft": "latentkit.methods.sft.method:SFT",
        "sft-curriculum": "latentkit.methods.sft.curriculum:SFTCurriculum",
        "monet": "latentkit.methods.monet.method:Monet",
        "valr": "latentkit.methods.valr.method:Valr",
        "palette": "latentkit.methods.palette.method:Palette",
        "grpo": "latentkit.methods.grpo.method:GRPO",
        "latentum": "latentkit.methods.latentum.method:Latentum",
    }


INSTALLED_METHODS = """
import json, sys
from importlib.metadata import distributions
import latentkit
from latentkit.registry import ENTRY_POINT_GROUP, list_methods
target = sys.argv[1]
from_wheel = sorted(p.name for d in distributions(path=[target]) for p in d.entry_points.select(group=ENTRY_POINT_GROUP))
listed = {i.name: [list(i.stages), i.source, i.error] for i in list_methods()}
print(json.dumps({"file": latentkit.__file__, "from_wheel": from_wheel, "listed": listed}))
"""


@pytest.mark.slow
def test_installed_wheel_lists_the_builtin_methods(built, tmp_path):
    """A plain (non-editable) install of the wheel exposes the built-in methods through its own metadata."""
    _, archive = built
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet"]
    result = subprocess.run(
        [*install, "--disable-pip-version-check", "--target", str(target), archive.filename],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-c", INSTALLED_METHODS, str(target)],
        cwd=tmp_path,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout)
    assert Path(found["file"]).is_relative_to(target), found["file"]  # the wheel's copy, not the editable one
    assert found["from_wheel"] == ["grpo", "latentum", "monet", "palette", "sft", "sft-curriculum", "valr"]
    assert found["listed"]["sft"] == [["sft"], "latentkit.methods.sft.method:SFT", None]
    assert found["listed"]["monet"][0] == ["warmup", "distill", "latent", "vlpo"]
    assert found["listed"]["valr"][0] == ["sft", "align"]
    assert found["listed"]["latentum"][0] == ["quantizer", "language", "vision", "pixels"]
