"""The repository root is the package `mrmae` (pyproject.toml's package-dir). setuptools
cannot discover packages under such a mapping from pyproject.toml alone, so they are found
here: every folder with an `__init__.py` below the root is a subpackage, listed by none
(a wheel once shipped without `train/masks/`, which a hand-written list had left out)."""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """This file sits in the package's folder but is no module of it."""

    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir) if (m[0], m[1]) != ("mrmae", "setup")]


subpackages = find_packages(".", exclude=["tests", "tests.*", "benchmarks", "benchmarks.*", "build", "build.*"])
setup(packages=["mrmae", *(f"mrmae.{name}" for name in subpackages)], cmdclass={"build_py": BuildPy})
