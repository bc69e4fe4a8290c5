"""`klein-gateway batch submit|status|cancel` against a served gateway (scripted backends, real prices)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.batch_client import progress_line
from gateway.cli import main
from tests.test_batches_api import KEY_A, Rig, lines_file


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_submit_wait_follows_the_batch_to_its_end_and_names_its_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rig = Rig(local_delay_s=0.2)
    with rig.server:
        path = tmp_path / "catalogue.jsonl"
        path.write_bytes(lines_file([{"prompt": f"p{i}", "size": "512x512"} for i in range(4)] + [{"prompt": "bad", "size": "13x13"}]))
        code, out, err = run(["batch", "submit", str(path), "--window", "1h", "--wait", "--url", rig.server.url, "--key", KEY_A], capsys)
        assert code == 0, err
        batch_id, rest = out.strip().split(" ", 1)
        assert batch_id.startswith("batch_") and rest.startswith("completed | 4/5 done | 1 failed | local 4, hosted 0")
        assert "output file-" in rest and "errors file-" in rest
        assert "validating" in err or "in_progress" in err  # the progress line was shown while it ran
        code, out, _ = run(["batch", "status", batch_id, "--url", rig.server.url, "--key", KEY_A], capsys)
        assert code == 0 and out.startswith(f"{batch_id} completed | 4/5 done")
        code, _, err = run(["batch", "cancel", batch_id, "--url", rig.server.url, "--key", KEY_A], capsys)
        assert code == 1 and "batch_not_cancellable" in err


def test_a_missing_file_or_an_unknown_batch_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rig = Rig()
    with rig.server:
        code, _, err = run(["batch", "submit", str(tmp_path / "nope.jsonl"), "--url", rig.server.url, "--key", KEY_A], capsys)
        assert code == 1 and "no such file" in err
        code, _, err = run(["batch", "status", "batch_000000000000000000000000", "--url", rig.server.url, "--key", KEY_A], capsys)
        assert code == 1 and "batch_not_found" in err and "HTTP 404" in err
    code, _, err = run(["batch", "status", "batch_x", "--url", "http://127.0.0.1:9"], capsys)
    assert code == 1 and "cannot reach the gateway" in err


@pytest.mark.parametrize(
    ("batch", "line"),
    [
        ({"status": "validating", "request_counts": {"total": 0, "completed": 0, "failed": 0}}, "validating | 0/0 done | 0 failed | local 0, hosted 0 | $0 spent"),
        (
            {
                "status": "completed",
                "request_counts": {"total": 3, "completed": 2, "failed": 1},
                "klein": {"lines_local": 1, "lines_hosted": 1, "spent_usd": "0.01", "forecast": {"cost_usd": "1", "finish_at": 0}},
            },
            "completed | 2/3 done | 1 failed | local 1, hosted 1 | $0.01 spent",
        ),
    ],
    ids=["nothing-yet", "ended-has-no-forecast"],
)
def test_the_progress_line_says_counts_placement_and_spend(batch: dict, line: str) -> None:
    assert progress_line(batch) == line
