"""The keys file: validation with the field named, lookup by SHA-256, reload
on change and on SIGHUP, and the key's rules applied to a job."""

from __future__ import annotations

import os
import time
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.domain.job import ImageJob, JobKind, ProviderPrefs
from gateway.money import keys as keys_module
from gateway.money.keys import KeyRing, KeysFileError, KeySpec, hash_key, load_keys_file, new_key
from gateway.money.tab import BackendNotAllowed, apply_key_rules

BACKENDS = {"fal", "replicate", "runflow", "empiriolabs", "local"}
REPO = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def entry(name: str, secret: str, extra: str = "") -> str:
    return f"  - name: {name}\n    key_sha256: {hash_key(secret)}\n{extra}"


def test_keys_new_prints_a_secret_whose_entry_admits_it(tmp_path, capsys):
    assert main(["keys", "new", "team-a"]) == 0
    out = capsys.readouterr().out
    secret = next(w for w in out.split() if w.startswith("sk-klein-"))
    entry_text = out[out.index("  - name:") :]
    path = write(tmp_path / "keys.yaml", "keys:\n" + entry_text)
    ring = KeyRing(path=path)
    caller = ring.lookup(secret)
    assert caller is not None and caller.name == "team-a"
    assert secret not in path.read_text()  # only its hash is in the file
    assert ring.lookup(secret + "x") is None


def test_two_new_keys_differ():
    assert new_key("a")[0] != new_key("a")[0]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("keys:\n  - name: a\n    key_sha256: abc\n", "keys.0.key_sha256: must be the 64 hex digits"),
        ("keys:\n  - name: 'bad name'\n    key_sha256: " + "a" * 64 + "\n", "keys.0.name"),
        ("keys:\n  - name: a\n    key_sha256: " + "a" * 64 + "\n    budget_usd: {day: -1}\n", "keys.0.budget_usd.day"),
        ("keys:\n  - name: a\n    key_sha256: " + "a" * 64 + "\n    budget_usd: {week: 1}\n", "keys.0.budget_usd.week"),
        ("keys:\n  - name: a\n    key_sha256: " + "a" * 64 + "\n    rate_limit: {requests_per_minute: 0}\n", "keys.0.rate_limit.requests_per_minute"),
        ("keys:\n  - name: a\n    key_sha256: " + "a" * 64 + "\n    backends: {only: [nope]}\n", "keys.0.backends.only: 'nope' is not a configured backend"),
        ("keys:\n  - name: a\n    key_sha256: " + "a" * 64 + "\n  - name: a\n    key_sha256: " + "b" * 64 + "\n", "key name 'a' appears twice"),
        ("keys:\n  - name: a\n    key_sha256: " + "a" * 64 + "\n  - name: b\n    key_sha256: " + "a" * 64 + "\n", "same key_sha256"),
        ("keys:\n  - name: a\n    key: plain-secret\n    key_sha256: " + "a" * 64 + "\n", "keys.0.key: Extra inputs"),
        ("- name: a\n", "expected a mapping with a 'keys' list"),
        ("keys: [\n", "not valid YAML"),
    ],
)
def test_a_bad_keys_file_names_the_field_and_the_problem(tmp_path, body, problem):
    path = write(tmp_path / "keys.yaml", body)
    with pytest.raises(KeysFileError) as exc:
        load_keys_file(path, BACKENDS)
    assert problem in str(exc.value) and str(path) in str(exc.value)


def test_check_config_validates_the_keys_file(tmp_path, capsys):
    good = write(tmp_path / "good.yaml", "keys:\n" + entry("team-a", "s1", "    budget_usd: {day: 5}\n    admin: true\n"))
    assert main(["check-config", "--config", str(REPO / "providers.yaml"), "--keys-file", str(good)]) == 0
    assert "key team-a" in capsys.readouterr().out
    bad = write(tmp_path / "bad.yaml", "keys:\n" + entry("team-a", "s1", "    backends: {only: [nope]}\n"))
    assert main(["check-config", "--config", str(REPO / "providers.yaml"), "--keys-file", str(bad)]) == 2
    assert "keys.0.backends.only: 'nope' is not a configured backend" in capsys.readouterr().err


def test_the_file_is_reread_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(keys_module, "RECHECK_S", 0.0)
    path = write(tmp_path / "keys.yaml", "keys:\n" + entry("team-a", "s1"))
    ring = KeyRing(path=path)
    assert ring.lookup("s2") is None
    write(path, "keys:\n" + entry("team-a", "s1") + entry("team-b", "s2"))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    assert ring.lookup("s2").name == "team-b"


def test_a_broken_edit_keeps_the_keys_in_force(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(keys_module, "RECHECK_S", 0.0)
    path = write(tmp_path / "keys.yaml", "keys:\n" + entry("team-a", "s1"))
    ring = KeyRing(path=path)
    write(path, "keys:\n  - name: team-a\n    key_sha256: typo\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    assert ring.lookup("s1").name == "team-a"
    assert "previous keys stay in force" in caplog.text


def test_reload_admits_a_new_key_without_a_restart(tmp_path):
    import httpx

    from tests.gateway_support import ENV, FakeAdapter, ServerThread, install_fakes, make_app

    path = write(tmp_path / "keys.yaml", "keys:\n" + entry("team-a", "s1"))
    app = make_app({**ENV, "KLEIN_KEYS_FILE": str(path)})
    install_fakes(app, {name: FakeAdapter(name) for name in app.state.gateway.fleet.backends})
    app.state.gateway.keyring._checked = float("inf")  # only the signal may reload in this test
    body = {"prompt": "x", "size": "512x512", "response_format": "b64_json"}
    # The SIGHUP handler calls reload(); the real signal is sent in the next test.
    with ServerThread(app) as server:
        assert httpx.post(f"{server.url}/v1/images/generations", json=body, headers={"authorization": "Bearer s2"}).status_code == 401
        write(path, "keys:\n" + entry("team-a", "s1") + entry("team-b", "s2"))
        assert app.state.gateway.keyring.reload()
        assert httpx.post(f"{server.url}/v1/images/generations", json=body, headers={"authorization": "Bearer s2"}).status_code == 200


def test_sighup_reaches_a_serving_process(tmp_path):
    """The real signal, on a real `klein-gateway serve` process."""
    import signal
    import subprocess
    import sys

    import httpx

    from tests.gateway_support import NO_LEDGER, free_port, wait_until

    path = write(tmp_path / "keys.yaml", "keys:\n" + entry("team-a", "s1"))
    port = free_port()
    env = {**os.environ, "KLEIN_KEYS_FILE": str(path), "PYTHONPATH": str(REPO), **NO_LEDGER}
    log = (tmp_path / "gw.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--emulate", "--workers", "1", "--port", str(port), "--log-level", "warning"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, 30), (tmp_path / "gw.log").read_text()

        def models(key: str) -> int:
            return httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=5).status_code

        assert models("s2") == 401
        # Same size and mtime would not trigger the change check; only the signal can reload now.
        stat = path.stat()
        write(path, "keys:\n" + entry("team-a", "s1").replace("team-a", "team-b").replace(hash_key("s1"), hash_key("s2")))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: models("s2") == 200, 10)
        assert models("s1") == 401
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


SPEC = KeySpec(name="team-a", key_sha256="a" * 64, max_price_usd=Decimal("0.01"), backends={"only": ("fal", "local")})


@pytest.mark.parametrize(
    ("prefs", "pinned", "only", "ignore", "max_price"),
    [
        (ProviderPrefs(), None, ("fal", "local"), (), Decimal("0.01")),
        (ProviderPrefs(only=("local", "replicate")), None, ("local",), (), Decimal("0.01")),  # narrowed, never widened
        (ProviderPrefs(ignore=("local",)), None, ("fal", "local"), ("local",), Decimal("0.01")),
        (ProviderPrefs(max_price=Decimal("0.002")), None, ("fal", "local"), (), Decimal("0.002")),  # lower: the caller's
        (ProviderPrefs(max_price=Decimal(5)), None, ("fal", "local"), (), Decimal("0.01")),  # higher: the key's ceiling
        (ProviderPrefs(), "FAL", ("fal", "local"), (), Decimal("0.01")),
    ],
)
def test_key_rules_narrow_the_callers_preferences(prefs, pinned, only, ignore, max_price):
    job = ImageJob(kind=JobKind.GENERATE, prompt="x", width=512, height=512, prefs=prefs, pinned_backend=pinned)
    ruled = apply_key_rules(job, SPEC)
    assert (ruled.prefs.only, ruled.prefs.ignore, ruled.prefs.max_price) == (only, ignore, max_price)


@pytest.mark.parametrize(
    ("prefs", "pinned", "param"),
    [(ProviderPrefs(), "replicate", "model"), (ProviderPrefs(only=("replicate",)), None, "provider.only")],
)
def test_a_backend_the_key_may_not_use_is_refused(prefs, pinned, param):
    job = ImageJob(kind=JobKind.GENERATE, prompt="x", width=512, height=512, prefs=prefs, pinned_backend=pinned)
    with pytest.raises(BackendNotAllowed) as exc:
        apply_key_rules(job, SPEC)
    assert exc.value.status == 403 and exc.value.param == param
