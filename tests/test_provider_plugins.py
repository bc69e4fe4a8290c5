"""A provider is one adapter class, one price sheet and one providers.yaml entry.

The Acme adapter (tests/plugins/) lives outside `gateway/` and is registered
by this module only; with it registered, config, the emulator launcher, logs
and the HTTP app serve it without any gateway module naming it. Also: options
are checked by name and type for every kind, and a credential read from a
renamed variable is scrubbed from logs by value.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

import gateway.providers as registry
from gateway.app import create_app
from gateway.config import ConfigError, load_config
from gateway.domain.capabilities import Capabilities
from gateway.observability.logs import configure_logging, secrets_from_env
from gateway.observability.metrics import GatewayMetrics
from gateway.providers import ENTRY_POINT_GROUP, adapter_class, kinds, register, unregister
from gateway.providers.base import Adapter
from gateway.redaction import redact
from tests.emulators.launcher import PROVIDERS, EmulatorFleet
from tests.gateway_support import ENV, PROVIDERS_YAML, REPO, ServerThread, image_size_of, make_app
from tests.plugins.acme_adapter import AcmeAdapter

WALK_THROUGH = REPO / "docs/adding-a-provider.md"


def doc_blocks(language: str) -> list[str]:
    """The fenced code blocks of the walk-through in `language`, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", WALK_THROUGH.read_text(), flags=re.DOTALL | re.MULTILINE)


# The walk-through's price sheet and providers.yaml entry are the ones these tests use.
ACME_SHEET = next(block for block in doc_blocks("yaml") if block.startswith("backend: acme"))
ACME_ENTRY: dict[str, Any] = next(yaml.safe_load(block) for block in doc_blocks("yaml") if block.startswith("backends:"))["backends"]["acme"]


@pytest.fixture
def acme() -> Iterator[type[AcmeAdapter]]:
    """Acme registered for one test, and gone again after it."""
    register(AcmeAdapter)
    try:
        yield AcmeAdapter
    finally:
        unregister("acme")


def write_config(root: Path, backends: dict[str, dict[str, Any]], baseline: str | None = None) -> Path:
    """providers.yaml with `backends`, beside the shipped price sheets plus Acme's."""
    shutil.copytree(REPO / "pricing", root / "pricing")
    (root / "pricing" / "acme.yaml").write_text(ACME_SHEET)
    path = root / "providers.yaml"
    path.write_text(yaml.safe_dump({"gateway": {"baseline_backend": baseline}, "backends": backends}))
    return path


def test_a_provider_registered_from_a_test_module_serves_a_request_end_to_end(acme: type[AcmeAdapter], tmp_path: Path) -> None:
    config = write_config(tmp_path, {"acme": ACME_ENTRY}, baseline="acme")
    fleet = EmulatorFleet.start_in_thread(["acme"])
    try:
        env = fleet.env()
        app = create_app(config, env=env, probes=False, metrics=GatewayMetrics(registry=CollectorRegistry()))
        with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
            response = client.post("/v1/images/generations", json={"model": "flux-2-klein-4b", "prompt": "a red fox", "size": "512x512", "n": 2, "response_format": "b64_json"})
            listing = client.get("/v1/backends").json()
        stats = fleet["acme"].app.stats
    finally:
        fleet.stop_thread()

    # The launcher found Acme's variables and key shape on the adapter class.
    assert set(env) == {"KLEIN_ACME_BASE_URL", "ACME_API_KEY"} and env["ACME_API_KEY"].startswith("acme_emu_")
    assert response.status_code == 200, response.text
    assert response.headers["x-klein-backend"] == "acme"
    assert Decimal(response.headers["x-klein-cost-usd"]) == Decimal("0.008")  # 2 images x the sheet's $0.004
    images = [base64.b64decode(item["b64_json"]) for item in response.json()["data"]]
    assert [image_size_of(data) for data in images] == [(512, 512), (512, 512)]
    assert (stats.generations, stats.images, stats.auth_failures) == (1, 2, 0)
    assert [(row["name"], row["kind"], row["price_source"]) for row in listing["data"]] == [("acme", "acme", "Acme's public price list (a test fixture)")]


def test_the_walk_through_shows_the_code_the_tests_run() -> None:
    adapter, emulator = doc_blocks("python")
    assert adapter == (REPO / "tests" / "plugins" / "acme_adapter.py").read_text()
    assert emulator == (REPO / "tests" / "plugins" / "acme_emulator.py").read_text()
    assert ACME_ENTRY["kind"] == AcmeAdapter.kind and ACME_ENTRY["options"] == {"quality": "draft"}


def test_acme_is_unknown_until_registered_and_gone_after(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"acme": {"kind": "acme"}})
    with pytest.raises(ConfigError) as exc:
        load_config(config, env={"ACME_API_KEY": "acme-key-0000"})
    assert "backends.acme.kind" in str(exc.value) and "unknown provider kind 'acme'" in str(exc.value)
    assert "acme" not in kinds() and "acme" not in PROVIDERS

    register(AcmeAdapter)
    try:
        resolved = load_config(config, env={"ACME_API_KEY": "acme-key-0000"}).backends[0]
        assert (resolved.base_url, resolved.credential, resolved.enabled) == ("https://api.acme.example", "acme-key-0000", True)
        assert "acme" in PROVIDERS
        assert secrets_from_env({"ACME_API_KEY": "acme-key-0000"}) == ["acme-key-0000"]
    finally:
        unregister("acme")
    assert "acme" not in kinds()


def test_an_installed_distribution_adds_a_provider_through_its_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `pip install acme-klein` leaves behind: a dist-info whose entry point names the adapter."""
    dist = tmp_path / "acme_klein-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-klein\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nacme = tests.plugins.acme_adapter:AcmeAdapter\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_discovered", False)
    try:
        assert "acme" in kinds()
        assert adapter_class("acme") is AcmeAdapter
    finally:
        unregister("acme")


def test_first_lookups_from_parallel_threads_all_wait_for_the_whole_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Apps built in threads at once (as the chaos test does) must not see a half-loaded registry."""
    loaded: list[str] = []
    real_import = registry.importlib.import_module

    def slow_import(name: str) -> object:  # the built-in modules, as slow to import as a cold start
        time.sleep(0.02)
        loaded.append(name)
        module = real_import(name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Adapter) and value.__module__ == name:
                register(value)
        return module

    monkeypatch.setattr(registry, "_registry", {})
    monkeypatch.setattr(registry, "_discovered", False)
    monkeypatch.setattr(registry.importlib, "import_module", slow_import)
    start = threading.Barrier(8)
    seen: list[tuple[str, ...]] = []

    def lookup() -> None:
        start.wait()
        seen.append(kinds())

    threads = [threading.Thread(target=lookup) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == [("empiriolabs", "fal", "local", "replicate", "runflow")] * 8
    assert sorted(loaded) == sorted(set(loaded)) and len(loaded) == 5  # one discovery, each module once


def test_a_kind_taken_by_another_class_is_refused(acme: type[AcmeAdapter]) -> None:
    class Impostor(AcmeAdapter):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register(Impostor)
    assert register(AcmeAdapter) is AcmeAdapter  # the same class again is fine
    assert adapter_class("acme") is AcmeAdapter


def test_an_adapter_without_its_metadata_is_refused() -> None:
    class Nameless(AcmeAdapter):
        kind = "no kind"

    with pytest.raises(ValueError, match="kind"):
        register(Nameless)


BAD_OPTIONS = [
    ("acme", {"qualty": "draft"}, "qualty"),
    ("acme", {"quality": "best"}, "quality"),
    ("acme", {"probe_timeout_s": "5s"}, "probe_timeout_s"),
    ("fal", {"sync_mod": True}, "sync_mod"),
    ("fal", {"max_poll_errors": "5"}, "max_poll_errors"),
    ("fal", {"model": "flux"}, "model"),
    ("replicate", {"prefer_wait_s": "ten"}, "prefer_wait_s"),
    ("replicate", {"go_fast": "yes"}, "go_fast"),
    ("replicate", {"sizes": {"1024x1024": {"output_megapixels": "1"}}}, "sizes"),
    ("runflow", {"image_sizes": "object"}, "image_sizes"),
    ("empiriolabs", {"size_field": 3}, "size_field"),
    ("local", {"batch": 4}, "batch"),
]


@pytest.mark.parametrize(("kind", "options", "name"), BAD_OPTIONS, ids=[f"{k}-{n}" for k, _, n in BAD_OPTIONS])
def test_a_typo_or_mistyped_option_is_refused_naming_backend_and_option(acme: type[AcmeAdapter], tmp_path: Path, kind: str, options: dict[str, Any], name: str) -> None:
    config = write_config(tmp_path, {kind: {"kind": kind, "options": options}})
    with pytest.raises(ConfigError) as exc:
        load_config(config, env={**ENV, "ACME_API_KEY": "acme-key-0000"})
    assert f"backends.{kind}.options" in str(exc.value)
    assert name in str(exc.value)


def test_check_config_names_a_mistyped_fal_option(tmp_path: Path) -> None:
    raw = yaml.safe_load(PROVIDERS_YAML.read_text())
    raw["backends"]["fal"]["options"] = {"start_timeout_s": "soon"}
    (tmp_path / "providers.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", "--config", str(tmp_path / "providers.yaml"), "--pricing", str(REPO / "pricing")],
        capture_output=True, text=True, timeout=60, env={**os.environ, **ENV},
    )  # fmt: skip
    assert proc.returncode != 0
    assert "backends.fal.options" in proc.stderr and "start_timeout_s" in proc.stderr


@pytest.mark.parametrize(
    ("kind", "queue_wait", "live_price", "reference_bytes", "credential_env"),
    [
        ("fal", False, False, False, "FAL_KEY"),
        ("replicate", False, False, False, "REPLICATE_API_TOKEN"),
        ("runflow", False, False, False, "RUNFLOW_API_KEY"),
        ("empiriolabs", False, False, False, "EMPIRIOLABS_API_KEY"),
        ("local", True, True, True, None),
    ],
)
def test_what_used_to_be_special_cased_by_name_is_declared_by_each_adapter(kind: str, queue_wait: bool, live_price: bool, reference_bytes: bool, credential_env: str | None) -> None:
    cls = adapter_class(kind)
    assert (cls.reports_queue_wait, cls.reports_live_price, cls.takes_reference_bytes, cls.credential_env) == (queue_wait, live_price, reference_bytes, credential_env)


async def test_a_backend_that_takes_reference_bytes_never_takes_urls_whatever_the_overrides(tmp_path: Path) -> None:
    raw = yaml.safe_load(PROVIDERS_YAML.read_text())
    raw["backends"]["local"]["capabilities"] = {"accepts_url_refs": True}
    (tmp_path / "providers.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "pricing").symlink_to(REPO / "pricing")
    app = make_app(config=tmp_path / "providers.yaml")
    caps: Capabilities = app.state.gateway.fleet.backends["local"].edit_capabilities
    assert caps.accepts_url_refs is False
    await app.state.gateway.close()


def test_a_credential_under_a_renamed_variable_is_scrubbed_from_logs(tmp_path: Path) -> None:
    secret = "zq" + uuid.uuid4().hex  # no shape rule matches it: only its value can
    assert redact(secret) == secret
    raw = yaml.safe_load(PROVIDERS_YAML.read_text())
    raw["backends"]["fal"]["credential_env"] = "TEAM_FAL_SECRET"
    (tmp_path / "providers.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "pricing").symlink_to(REPO / "pricing")
    env = {k: v for k, v in ENV.items() if k != "FAL_KEY"} | {"TEAM_FAL_SECRET": secret}

    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = configure_logging(stream=stream, secrets=[])
    try:
        app = make_app(env, config=tmp_path / "providers.yaml")
        assert app.state.gateway.fleet.backends["fal"].adapter.settings.credential == secret
        logging.getLogger("klein.test").warning("upstream echoed %s back", secret)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    written = stream.getvalue()
    assert secret not in written
    assert "upstream echoed [REDACTED] back" in written
