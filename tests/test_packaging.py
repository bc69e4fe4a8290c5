"""A built wheel carries the default providers.yaml and pricing/, and they work from anywhere.

The wheel is built for real (pip wheel, as `pip install .` does) and run
unpacked from an empty directory, with the repository off sys.path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.gateway_support import REPO

pytestmark = pytest.mark.slow
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "providers.yaml", "pricing", "gateway", "local_backend")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of what the build reads, so the checkout gains no build/ or egg-info."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("klein_gateway-*.whl")
    return built


def test_the_wheel_holds_the_repository_config_byte_for_byte(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        assert whl.read("gateway/defaults/providers.yaml") == (REPO / "providers.yaml").read_bytes()
        for sheet in (REPO / "pricing").glob("*.yaml"):
            assert whl.read(f"gateway/defaults/pricing/{sheet.name}") == sheet.read_bytes()
    assert "gateway/config.py" in names and "local_backend/cli.py" in names


@pytest.mark.parametrize("command,expect", [(["check-config"], "gateway/defaults/providers.yaml and"), (["quote", "--n", "2"], "chosen:")])
def test_the_installed_package_runs_from_an_empty_directory(wheel: Path, tmp_path: Path, command: list[str], expect: str) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as whl:
        whl.extractall(site)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("KLEIN_CONFIG", "KLEIN_PRICING")}
    env["PYTHONPATH"] = str(site)  # ahead of any editable install of the repository
    probe = "import gateway, sys; from gateway.cli import main; assert gateway.__file__.startswith(sys.argv[1]), gateway.__file__; sys.exit(main(sys.argv[2:]))"
    proc = subprocess.run([sys.executable, "-c", probe, str(site), *command], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expect in proc.stdout
