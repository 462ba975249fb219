"""Lists every nested package under the mapped top-level folders, so none is silently left out of the wheel."""

from pathlib import Path

from setuptools import setup

ROOTS = {
    "latentkit": "latentkit",
    "latentkit.methods": "methods",
    "latentkit.kernels": "kernels",
    "latentkit.cli": "cli",
}


def _packages() -> tuple[list[str], dict[str, str]]:
    packages, package_dir = [], {}
    for name, folder in ROOTS.items():
        for init in sorted(Path(folder).rglob("__init__.py")):
            rel = init.parent.relative_to(folder).parts
            dotted = ".".join((name, *rel))
            packages.append(dotted)
            package_dir[dotted] = str(init.parent)
    return packages, package_dir


packages, package_dir = _packages()
setup(packages=packages, package_dir=package_dir)
