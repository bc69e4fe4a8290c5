"""Which providers.yaml a command uses, from any directory, and `klein-gateway init`.

Order: --config, then KLEIN_CONFIG, then ./providers.yaml, then the defaults
shipped with the package. A file that was named but is missing is an error
that says what was tried and how to point elsewhere, never a silent fallback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.config import CONFIG_ENV, ConfigError, find_config, load_config, shipped_config
from tests.gateway_support import ENV, REPO


def write_config(where: Path) -> Path:
    """A providers.yaml with its pricing/ beside it, as `init` would write."""
    shutil.copytree(REPO / "pricing", where / "pricing", dirs_exist_ok=True)
    shutil.copyfile(REPO / "providers.yaml", where / "providers.yaml")
    return where / "providers.yaml"


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    """A flag file, an env file and a working directory holding its own providers.yaml."""
    return {"flag": write_config(tmp_path / "flag"), "env": write_config(tmp_path / "env"), "cwd": write_config(tmp_path / "cwd")}


@pytest.mark.parametrize(
    "flag,env,cwd_has_file,expected",
    [
        (True, True, True, "flag"),
        (False, True, True, "env"),
        (False, False, True, "cwd"),
        (False, False, False, "shipped"),
        (True, False, False, "flag"),
        (False, True, False, "env"),
    ],
)
def test_config_is_found_flag_then_env_then_cwd_then_shipped(places, tmp_path, flag, env, cwd_has_file, expected):
    cwd = places["cwd"].parent if cwd_has_file else tmp_path / "empty"
    cwd.mkdir(exist_ok=True)
    environ = {CONFIG_ENV: str(places["env"])} if env else {}
    found = find_config(places["flag"] if flag else None, env=environ, cwd=cwd)
    assert found.resolve() == (shipped_config() if expected == "shipped" else places[expected]).resolve()


@pytest.mark.parametrize("named_by", ["--config", CONFIG_ENV])
def test_a_named_file_that_is_missing_is_an_error_not_a_fallback(tmp_path, named_by):
    missing = tmp_path / "nowhere.yaml"
    write_config(tmp_path)  # ./providers.yaml exists and must not be used instead
    with pytest.raises(ConfigError) as exc:
        if named_by == "--config":
            find_config(missing, env={}, cwd=tmp_path)
        else:
            find_config(None, env={CONFIG_ENV: str(missing)}, cwd=tmp_path)
    message = str(exc.value)
    assert str(missing) in message and f"named by {named_by}" in message
    assert "--config PATH" in message and f"{CONFIG_ENV}=PATH" in message and "klein-gateway init" in message


def test_nothing_found_names_every_path_tried(tmp_path, monkeypatch):
    monkeypatch.setattr("gateway.config.shipped_config", lambda: tmp_path / "pkg" / "providers.yaml")
    with pytest.raises(ConfigError) as exc:
        find_config(None, env={}, cwd=tmp_path)
    message = str(exc.value)
    assert str(tmp_path / "providers.yaml") in message and str(tmp_path / "pkg" / "providers.yaml") in message
    assert "--config PATH" in message and f"{CONFIG_ENV}=PATH" in message


def test_load_config_without_a_path_uses_the_environment_it_is_given(places):
    config = load_config(env={**ENV, CONFIG_ENV: str(places["env"])})
    assert config.path == places["env"]
    assert config.pricing_dir == places["env"].parent / "pricing"


def test_the_shipped_defaults_are_the_repository_files_in_a_checkout():
    assert shipped_config().read_text() == (REPO / "providers.yaml").read_text()
    assert sorted(p.name for p in (shipped_config().parent / "pricing").glob("*.yaml")) == sorted(p.name for p in (REPO / "pricing").glob("*.yaml"))


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in (CONFIG_ENV, "KLEIN_PRICING")}
    environ.update(PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [["check-config"], ["quote", "--size", "512x512"]])
def test_commands_work_from_a_directory_without_providers_yaml(tmp_path, command):
    proc = cli(*command, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ok:" in proc.stdout if command[0] == "check-config" else "chosen:" in proc.stdout


def test_cli_error_for_a_missing_config_names_it_and_the_ways_out(tmp_path):
    proc = cli("check-config", cwd=tmp_path, env={CONFIG_ENV: str(tmp_path / "gone.yaml")})
    assert proc.returncode == 2
    assert "gone.yaml: file not found (named by KLEIN_CONFIG)" in proc.stderr and "--config PATH" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_init_writes_an_editable_copy_that_the_commands_then_use(tmp_path):
    proc = cli("init", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "providers.yaml").read_text() == (REPO / "providers.yaml").read_text()
    assert sorted(p.name for p in (tmp_path / "pricing").iterdir()) == sorted(p.name for p in (REPO / "pricing").glob("*.yaml"))
    # An edit to the copy is what the next command prices with.
    sheet = tmp_path / "pricing" / "empiriolabs.yaml"
    raw = yaml.safe_load(sheet.read_text())
    assert raw["basis"] == "per_image"
    raw["usd_per_image"] = "0.000001"
    sheet.write_text(yaml.safe_dump(raw))
    quote = cli("quote", "--size", "512x512", cwd=tmp_path)
    assert quote.returncode == 0, quote.stderr
    assert "chosen: empiriolabs" in quote.stdout


def test_init_into_a_named_directory_refuses_to_overwrite_and_leaves_everything_as_it_was(tmp_path):
    target = tmp_path / "conf"
    assert cli("init", str(target), cwd=tmp_path).returncode == 0
    (target / "pricing" / "fal.yaml").write_text("# mine\n")
    before = {p: p.read_bytes() for p in target.rglob("*.yaml")}
    proc = cli("init", str(target), cwd=tmp_path)
    assert proc.returncode == 1
    assert "not overwriting" in proc.stderr and "--force" in proc.stderr
    assert {p: p.read_bytes() for p in target.rglob("*.yaml")} == before
    forced = cli("init", str(target), "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert (target / "pricing" / "fal.yaml").read_text() == (REPO / "pricing" / "fal.yaml").read_text()
    assert f"--config {target / 'providers.yaml'}" in forced.stdout
