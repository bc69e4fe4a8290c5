"""`klein-gateway quote` shows the size each backend would produce, and honours the public base URL."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from gateway.cli import main
from tests.gateway_support import PROVIDERS_YAML, SECRETS


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KLEIN_PUBLIC_BASE_URL", raising=False)
    return monkeypatch


def rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in out.splitlines()[2:] if line and not line.startswith("chosen")}


def test_an_aspect_ratio_quote_prices_replicate_at_its_native_size(env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quote", "--config", str(PROVIDERS_YAML), "--aspect-ratio", "16:9"]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert table["replicate"][1:3] == ["1365x768", "0.00104832"]
    assert table["fal"][1:3] == ["1360x768", "0.00522240"]
    assert out.splitlines()[0].startswith("aspect ratio 16:9 (1360x768)")


@pytest.mark.parametrize("public_url,eligible", [(None, "no"), ("https://gw.example.com", "yes")])
def test_an_upload_edit_quote_lends_empiriolabs_a_url_only_with_a_public_base_url(env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], public_url: str | None, eligible: str) -> None:
    if public_url:
        env.setenv("KLEIN_PUBLIC_BASE_URL", public_url)
    assert main(["quote", "--config", str(PROVIDERS_YAML), "--size", "1024x768", "--edit-images", "2"]) == 0
    assert rows(capsys.readouterr().out)["empiriolabs"][1:5] == ["1024x768", "0.00850000", "per_image", eligible]


def config_with_local(tmp_path: Path, *, enabled: bool) -> Path:
    """The test providers.yaml with the local GPU, the cheapest backend, switched on or off."""
    raw = yaml.safe_load(PROVIDERS_YAML.read_text())
    raw["backends"]["local"]["enabled"] = enabled
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump(raw))
    shutil.copytree(PROVIDERS_YAML.parent / "pricing", tmp_path / "pricing")
    return path


@pytest.mark.parametrize(
    "enabled,local_url,chosen,local_reason",
    [
        (True, "http://local.test:9000", "local", ""),
        (False, "http://local.test:9000", "replicate", "disabled in providers.yaml"),
        (True, None, "replicate", "no address: set KLEIN_LOCAL_URL"),
    ],
)
def test_a_quote_never_chooses_a_backend_the_server_could_not_route_to(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, enabled: bool, local_url: str | None, chosen: str, local_reason: str
) -> None:
    if local_url:
        env.setenv("KLEIN_LOCAL_URL", local_url)
    else:
        env.delenv("KLEIN_LOCAL_URL", raising=False)
    assert main(["quote", "--config", str(config_with_local(tmp_path, enabled=enabled)), "--size", "1024x1024", "--edit-images", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"chosen: {chosen} at 1024x1024"
    local = rows(out)["local"]
    assert local[4] == ("yes" if chosen == "local" else "no")
    assert " ".join(local[5:]) == local_reason
