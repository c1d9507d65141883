"""Package layout that setup.cfg cannot say on its own.

``components/`` and ``pipelines/`` live at the repository root (see docs/architecture.md) and install as
``audiotune.components`` and ``audiotune.pipelines`` through setup.cfg's ``package_dir``; ``find:``
only searches ``src``, so they are added here, with the compiled pipeline YAML as package data.
Everything else is in setup.cfg.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages("src") + ["audiotune.components", "audiotune.pipelines"],
    package_data={"audiotune.pipelines": ["compiled/*.yaml"]},
)
