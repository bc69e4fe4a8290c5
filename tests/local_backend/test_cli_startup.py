"""`klein-local serve` refuses at once, saying what to do, when it could never become ready.

The import failures are simulated the way Python reports a missing package
(`sys.modules[name] = None` makes `import name` raise ImportError); a real
process shows it exits before binding a port.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from local_backend import cli
from local_backend.config import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal must come before uvicorn ever runs."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("uvicorn.run was reached")

    monkeypatch.setattr("uvicorn.run", refuse)


@pytest.mark.parametrize("missing", ["torch", "diffusers"])
def test_a_missing_package_is_refused_with_the_install_command(monkeypatch, capsys, no_serving, missing):
    monkeypatch.setitem(sys.modules, missing, None)
    assert cli.main(["serve", "--tiny", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{missing} cannot be imported" in err
    assert "pip install 'klein-gateway[local]'" in err and "--index-url https://download.pytorch.org/whl/cpu" in err


def test_a_diffusers_without_the_pipeline_is_refused(monkeypatch, capsys, no_serving):
    monkeypatch.setitem(sys.modules, "diffusers", type(sys)("diffusers"))  # an old release: no Flux2KleinPipeline
    assert cli.main(["serve", "--tiny"]) == 2
    assert "has no Flux2KleinPipeline" in capsys.readouterr().err


def model_folder(root: Path, index: dict[str, object] | None) -> Path:
    root.mkdir()
    if index is not None:
        (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.mark.parametrize(
    "index,problem",
    [
        ("absent", "no such folder"),
        (None, "no model_index.json"),
        ({"_class_name": "StableDiffusionPipeline"}, "holds a StableDiffusionPipeline pipeline, not Flux2KleinPipeline"),
    ],
)
def test_a_wrong_model_path_is_refused_naming_it(tmp_path, capsys, no_serving, index, problem):
    path = tmp_path / "missing" if index == "absent" else model_folder(tmp_path / "model", index)
    assert cli.main(["serve", "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and problem in err and "hf download black-forest-labs/FLUX.2-klein-4B" in err


def test_a_diffusers_pipeline_folder_passes(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    folder = model_folder(tmp_path / "model", {"_class_name": "Flux2KleinPipeline", "is_distilled": True})
    assert cli.startup_problem(Settings(model_path=folder)) is None
    assert cli.startup_problem(Settings(tiny=True)) is None


def test_the_process_exits_at_once_without_torch(tmp_path):
    script = "import sys; sys.modules['torch'] = None; from local_backend.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", script, "serve", "--tiny", "--port", "9"], cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "klein-local: cannot serve: torch cannot be imported" in proc.stderr
    assert "Traceback" not in proc.stderr
