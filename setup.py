"""Ship the repository's providers.yaml and pricing/ inside the package.

The top-level files stay the one source; a wheel carries a copy of them as
gateway/defaults/, which `gateway.config.find_config` falls back to when no
--config, KLEIN_CONFIG or ./providers.yaml is given. Everything else about
the build is declared in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithDefaults(build_py):
    """build_py, plus the default configuration copied into the built package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the repository's own files
            return
        target = Path(self.build_lib) / "gateway" / "defaults"
        (target / "pricing").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / "providers.yaml", target / "providers.yaml")
        for sheet in sorted((ROOT / "pricing").glob("*.yaml")):
            shutil.copyfile(sheet, target / "pricing" / sheet.name)


setup(cmdclass={"build_py": BuildWithDefaults})
