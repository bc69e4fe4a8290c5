"""gateway/settings.py: every environment variable in one class, read when asked, documented from itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.settings import Settings, markdown, variables

REPO = Path(__file__).resolve().parent.parent
GATEWAY = REPO / "gateway"


def _string_constants(trees: dict[Path, ast.Module]) -> dict[str, str]:
    """Module-level `NAME = "..."` (or `NAME: Final = "..."`) across gateway/, so `os.environ.get(PORT_ENV)` is resolved."""
    found: dict[str, str] = {}
    for tree in trees.values():
        for node in tree.body:
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else node.target if isinstance(node, ast.AnnAssign) else None
            value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
            if isinstance(target, ast.Name) and isinstance(value, ast.Constant) and isinstance(value.value, str):
                found[target.id] = value.value
    return found


def _is_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name) and node.value.id == "os") or (isinstance(node, ast.Name) and node.id == "environ")


def _key(node: ast.AST, constants: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
    return constants.get(name) if name else None


def environ_reads(tree: ast.Module, constants: dict[str, str]) -> list[tuple[int, str]]:
    """(line, variable) of each os.environ.get(X), os.environ[X] read, X in os.environ and os.getenv(X)."""
    reads = []
    for node in ast.walk(tree):
        key: ast.AST | None = None
        if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute):
            if (node.func.attr == "get" and _is_environ(node.func.value)) or (node.func.attr == "getenv" and isinstance(node.func.value, ast.Name) and node.func.value.id == "os"):
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
            key = node.slice
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.In | ast.NotIn) and _is_environ(node.comparators[0]):
            key = node.left
        variable = _key(key, constants) if key is not None else None
        if variable is not None:
            reads.append((node.lineno, variable))
    return reads


def _gateway_trees() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in GATEWAY.rglob("*.py")}


def test_the_committed_docs_page_is_what_the_class_generates() -> None:
    assert (REPO / "docs/settings.md").read_text() == markdown(), "regenerate it with python -m gateway.settings"


def test_python_dash_m_prints_the_table() -> None:
    out = subprocess.run([sys.executable, "-m", "gateway.settings"], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out == markdown()
    assert "| `REDIS_URL` | `str \\| None` |" in out


def test_no_module_but_settings_reads_a_declared_variable_from_os_environ() -> None:
    trees = _gateway_trees()
    constants, declared = _string_constants(trees), set(variables())
    offenders = [f"{path.relative_to(REPO)}:{line} reads {var}" for path, tree in trees.items() if path != GATEWAY / "settings.py" for line, var in environ_reads(tree, constants) if var in declared]
    assert offenders == [], "read it through gateway.settings.Settings.from_env instead"


@pytest.mark.parametrize(
    "source",
    [
        'import os\nos.environ.get("REDIS_URL")',
        'import os\nos.environ["REDIS_URL"]',
        'import os\nos.getenv("REDIS_URL", "x")',
        'import os\n"REDIS_URL" in os.environ',
        'import os\nURL_ENV = "REDIS_URL"\nos.environ.get(URL_ENV)',
    ],
)
def test_the_environ_scan_catches_every_way_of_reading(source: str) -> None:
    tree = ast.parse(source)
    assert [var for _, var in environ_reads(tree, _string_constants({Path("x.py"): tree}))] == ["REDIS_URL"]


def test_writing_the_environment_is_not_a_read() -> None:
    tree = ast.parse('import os\nos.environ["KLEIN_WORKERS"] = "2"\nos.environ.setdefault("KLEIN_METRICS_KEY_SECRET", "s")')
    assert environ_reads(tree, {}) == []


def test_from_env_reads_the_given_mapping_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://from-os-environ")
    given = Settings.from_env({"KLEIN_STATE_NAMESPACE": "blue"})
    assert (given.redis_url, given.state_namespace) == (None, "blue")


def test_from_env_without_a_mapping_reads_os_environ_when_called(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KLEIN_USAGE_LEDGER", raising=False)
    assert Settings.from_env().usage_ledger is None
    monkeypatch.setenv("KLEIN_USAGE_LEDGER", "/tmp/ledger.sqlite")
    assert Settings.from_env().usage_ledger == "/tmp/ledger.sqlite"


def test_the_same_values_are_validated_once_and_new_values_are_not_missed() -> None:
    first = Settings.from_env({"KLEIN_S3_BUCKET": "a"})
    assert Settings.from_env({"KLEIN_S3_BUCKET": "a"}) is first
    assert Settings.from_env({"KLEIN_S3_BUCKET": "b"}).s3_bucket == "b"
    assert Settings.from_env({}).s3_bucket is None


def test_names_are_matched_exactly() -> None:
    assert Settings.from_env({"redis_url": "redis://lowercase", "Klein_Config": "x.yaml"}).redis_url is None
    lower = Settings.from_env({"prometheus_multiproc_dir": "/tmp/m"})
    assert (lower.prometheus_multiproc_dir, lower.prometheus_multiproc_dir_lowercase) == (None, "/tmp/m")


def test_a_bad_value_waits_for_its_reader() -> None:
    """A port or store kind is checked where it is used, so it never breaks a read of another variable."""
    settings = Settings.from_env({"KLEIN_METRICS_PORT": "not-a-port", "KLEIN_WORKERS": "many", "REDIS_URL": "redis://r"})
    assert (settings.metrics_port, settings.workers, settings.redis_url) == ("not-a-port", "many", "redis://r")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), (" Yes ", True), ("ON", True), ("0", False), ("", False), ("maybe", False), (None, False)],
)
def test_prompt_length_is_on_only_for_the_words_that_mean_yes(value: str | None, expected: bool) -> None:
    env = {} if value is None else {"KLEIN_LOG_PROMPT_LENGTH": value}
    assert Settings.from_env(env).log_prompt_length is expected


def test_defaults_are_the_read_sites_defaults() -> None:
    settings = Settings.from_env({})
    assert (settings.log_level, settings.state_namespace, settings.log_prompt_length) == ("INFO", "default", False)


def test_secrets_stay_out_of_repr() -> None:
    secret = "s3cr3t-value-0123456789"
    names = (
        "KLEIN_GATEWAY_KEYS",
        "KLEIN_METRICS_TOKEN",
        "KLEIN_METRICS_KEY_SECRET",
        "KLEIN_URL_SIGNING_KEY",
        "KLEIN_WEBHOOK_SECRET",
        "REDIS_URL",
        "DATABASE_URL",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    )
    settings = Settings.from_env(dict.fromkeys(names, secret))
    assert secret not in repr(settings) and secret not in str(settings)


def test_every_field_is_documented_and_read_from_one_variable() -> None:
    assert len(variables()) == len(Settings.model_fields)
    assert all(field.description for field in Settings.model_fields.values())
