"""providers.yaml: the environment applies as documented; bad files name file, field and problem."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from tests.gateway_support import ENV, PROVIDERS_YAML, REPO


def test_shipped_config_enables_every_backend_with_credentials():
    config = load_config(PROVIDERS_YAML, env=ENV)
    assert sorted(b.name for b in config.enabled) == ["empiriolabs", "fal", "local", "replicate", "runflow"]


def test_backend_without_credential_is_disabled_and_says_which_variable():
    env = {k: v for k, v in ENV.items() if k not in ("FAL_KEY", "KLEIN_LOCAL_URL")}
    reasons = {b.name: b.disabled_reason for b in load_config(PROVIDERS_YAML, env=env).backends}
    assert reasons["fal"] == "no credential: set FAL_KEY"
    assert reasons["local"] == "no address: set KLEIN_LOCAL_URL"
    assert reasons["replicate"] is None


@pytest.mark.parametrize(
    "name,var,default",
    [
        ("fal", "KLEIN_FAL_BASE_URL", "https://queue.fal.run"),
        ("replicate", "KLEIN_REPLICATE_BASE_URL", "https://api.replicate.com"),
        ("runflow", "KLEIN_RUNFLOW_BASE_URL", "https://api.runflow.io"),
        ("empiriolabs", "KLEIN_EMPIRIOLABS_BASE_URL", "https://api.empiriolabs.ai"),
    ],
)
def test_base_url_variables_override_the_documented_defaults(name, var, default):
    by_name = {b.name: b for b in load_config(PROVIDERS_YAML, env=ENV).backends}
    assert by_name[name].base_url == default
    by_name = {b.name: b for b in load_config(PROVIDERS_YAML, env={**ENV, var: "http://127.0.0.1:9999/"}).backends}
    assert by_name[name].base_url == "http://127.0.0.1:9999"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copy(PROVIDERS_YAML, tmp_path / "providers.yaml")
    shutil.copytree(REPO / "pricing", tmp_path / "pricing")
    return tmp_path


BAD_FILES = [
    ("unknown_kind", "  fal:\n    kind: fal\n", "  fal:\n    kind: falx\n", "backends.fal.kind"),
    ("negative_timeout", "timeouts: {connect: 5, request: 30,", "timeouts: {connect: -5, request: 30,", "backends.fal.timeouts.connect"),
    ("unknown_field", "    price_sheet: fal.yaml\n", "    price_sheet: fal.yaml\n    colour: blue\n", "backends.fal.colour"),
    ("missing_price_sheet", "price_sheet: fal.yaml", "price_sheet: nowhere.yaml", "nowhere.yaml"),
    ("bad_capability_override", "    price_sheet: replicate.yaml\n", "    price_sheet: replicate.yaml\n    capabilities: {max_sides: 3}\n", "backends.replicate.capabilities"),
    ("unknown_baseline", "baseline_backend: fal", "baseline_backend: nobody", "gateway.baseline_backend"),
    ("deadline_zero", "default_deadline_s: 120", "default_deadline_s: 0", "gateway.default_deadline_s"),
    ("not_yaml", "backends:", "backends: [unclosed", "not valid YAML"),
]


@pytest.mark.parametrize("label,old,new,field", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_providers_file_names_file_and_field(workdir, label, old, new, field):
    path = workdir / "providers.yaml"
    text = path.read_text()
    assert old in text, f"fixture drifted: {old!r}"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as exc:
        load_config(path, env=ENV)
    assert str(path) in str(exc.value)
    assert field in str(exc.value)


def test_bad_price_sheet_is_named_by_load_config(workdir):
    sheet = workdir / "pricing" / "fal.yaml"
    sheet.write_text(sheet.read_text().replace("usd_per_mp: ", "usd_per_mp: -", 1))
    with pytest.raises(ConfigError) as exc:
        load_config(workdir / "providers.yaml", env=ENV)
    assert "fal.yaml" in str(exc.value) and "usd_per_mp" in str(exc.value)


def test_check_config_command_exits_nonzero_naming_the_field(workdir):
    path = workdir / "providers.yaml"
    path.write_text(path.read_text().replace("kind: runflow", "kind: runflw", 1))
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "backends.runflow.kind" in proc.stderr


def test_check_config_command_passes_on_the_shipped_files():
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", "--config", str(PROVIDERS_YAML)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "ok:" in proc.stdout
