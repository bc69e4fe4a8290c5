"""`klein-gateway generate`: the server-sent events parsed as the SDKs do, the progress line, the image written, clear errors.

The gateway is an httpx MockTransport that answers the OpenAI streaming shape,
so these tests pin the client's side of the protocol; the served stream is
tested against the real gateway in the streaming tests.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

import httpx
import pytest

from gateway import client
from gateway.client import Event, Progress, parse_sse
from tests.gateway_support import image_size_of, png_bytes

PNG = png_bytes(64, 48)


@pytest.mark.parametrize(
    ("lines", "events"),
    [
        (["event: a", "data: 1", ""], [Event("a", "1")]),
        (['data: {"x":', "data: 1}", ""], [Event(None, '{"x":\n1}')]),
        ([": progress queued (position 2)", "event: b", "data:2", ""], [Event("comment", "progress queued (position 2)"), Event("b", "2")]),
        (["event: a", "data: 1"], [Event("a", "1")]),  # the last event needs no blank line
        (["event: only-a-name", "", "data: x", ""], [Event(None, "x")]),  # an event with no data is not dispatched
        (["data: a\r\n", "\r\n"], [Event(None, "a")]),
    ],
)
def test_server_sent_events_are_parsed_as_the_standard_says(lines: list[str], events: list[Event]) -> None:
    assert list(parse_sse(lines)) == events


@pytest.mark.parametrize(
    ("progress", "line"),
    [
        (Progress(started=0.0), "  2.0s | submitted"),
        (Progress(started=0.0, backend="fal", price="0.00524288", status="IN_QUEUE", previews_asked=2), "  2.0s | IN_QUEUE | on fal | $0.00524288 | previews 0/2"),
        (Progress(started=0.0, backend="local", status="previews arriving", previews=1, previews_asked=1), "  2.0s | previews arriving | on local | previews 1/1"),
    ],
)
def test_the_progress_line_says_backend_price_status_and_previews(progress: Progress, line: str) -> None:
    assert progress.render(2.0) == line


@pytest.mark.parametrize(
    ("said", "shown"),
    [
        ('{"backend": "fal", "status": "IN_QUEUE", "queue_position": 2}', "IN_QUEUE (position 2)"),
        ('{"backend": "runflow", "status": "running"}', "running"),
        ("rendering", "rendering"),
        ('["not", "an", "object"]', '["not", "an", "object"]'),
    ],
)
def test_a_providers_progress_comment_is_shown_as_its_status(said: str, shown: str) -> None:
    assert client.status_text(said) == shown


def sse(*events: tuple[str, dict] | str) -> bytes:
    out = []
    for e in events:
        if isinstance(e, str):
            out.append(f": {e}\n\n")
        else:
            out.append(f"event: {e[0]}\ndata: {json.dumps(e[1])}\n\n")
    return "".join(out).encode()


def args_for(tmp_path: Path, **over: object) -> argparse.Namespace:
    ns = {
        "prompt": "a red fox",
        "size": "64x48",
        "out": tmp_path / "fox.png",
        "edit": [],
        "output_format": "png",
        "partial_images": 2,
        "model": "flux-2-klein-4b",
        "url": "http://gateway.test",
        "key": "sk-caller",
        "timeout": 10.0,
    }
    return argparse.Namespace(**(ns | over))


def served(handler: httpx.MockTransport) -> httpx.Client:
    return httpx.Client(transport=handler)


def run(args: argparse.Namespace, respond: httpx.Response, seen: list[httpx.Request] | None = None) -> tuple[int, str, str]:
    def handle(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return respond

    out, err = io.StringIO(), io.StringIO()
    code = client.run(args, client=served(httpx.MockTransport(handle)), out=out, err=err, clock=lambda: 0.0)
    return code, out.getvalue(), err.getvalue()


COMPLETED = {
    "type": "image_generation.completed",
    "b64_json": base64.b64encode(PNG).decode(),
    "size": "64x48",
    "output_format": "png",
    "klein": {"backend": "fal", "cost_usd": "0.00001536", "attempts": 2},
}


def test_a_streamed_generation_writes_the_image_and_says_where_and_for_how_much(tmp_path: Path) -> None:
    body = sse(
        "progress IN_QUEUE", ("image_generation.partial_image", {"type": "image_generation.partial_image", "b64_json": "aGk=", "partial_image_index": 0}), ("image_generation.completed", COMPLETED)
    )
    seen: list[httpx.Request] = []
    code, out, err = run(
        args_for(tmp_path), httpx.Response(200, content=body, headers={"content-type": "text/event-stream", "x-klein-planned-backend": "fal", "x-klein-quote-usd": "0.00001536"}), seen
    )
    assert code == 0, err
    assert image_size_of((tmp_path / "fox.png").read_bytes()) == (64, 48)
    assert out == f"wrote {tmp_path / 'fox.png'} (64x48, fal, $0.00001536, 2 attempts)\n"
    assert "IN_QUEUE" in err and "previews 1/2" in err and "on fal | $0.00001536" in err
    sent = json.loads(seen[0].content)
    assert (seen[0].url.path, sent["stream"], sent["partial_images"], sent["response_format"]) == ("/v1/images/generations", True, 2, "b64_json")
    assert seen[0].headers["authorization"] == "Bearer sk-caller"


def test_edit_images_go_as_multipart_to_the_edits_route(tmp_path: Path) -> None:
    ref = tmp_path / "ref.png"
    ref.write_bytes(PNG)
    seen: list[httpx.Request] = []
    done = {**COMPLETED, "type": "image_edit.completed"}
    code, _, err = run(args_for(tmp_path, edit=[ref]), httpx.Response(200, content=sse(("image_edit.completed", done))), seen)
    assert code == 0, err
    request = seen[0]
    assert request.url.path == "/v1/images/edits" and request.headers["content-type"].startswith("multipart/form-data")
    assert b'name="stream"\r\n\r\ntrue' in request.content and PNG in request.content


@pytest.mark.parametrize(
    ("respond", "message"),
    [
        (
            httpx.Response(400, json={"error": {"message": "size must be WxH", "type": "invalid_request_error", "param": "size", "code": "invalid_size"}}),
            "error: size must be WxH (invalid_size, HTTP 400)",
        ),
        (httpx.Response(502, text="bad gateway"), "error: HTTP 502 from the gateway"),
        (
            httpx.Response(200, content=sse(("error", {"type": "error", "error": {"message": "every eligible backend failed", "code": "all_backends_failed"}}))),
            "error: every eligible backend failed (all_backends_failed)",
        ),
        (httpx.Response(200, content=sse("progress IN_QUEUE")), "error: the stream ended before the image was completed"),
    ],
    ids=["refused", "not-the-envelope", "error-event", "cut-short"],
)
def test_failures_exit_1_with_the_gateways_reason_and_write_nothing(tmp_path: Path, respond: httpx.Response, message: str) -> None:
    code, out, err = run(args_for(tmp_path), respond)
    assert code == 1 and out == ""
    assert err.rstrip().endswith(message), err
    assert not (tmp_path / "fox.png").exists()


def test_a_gateway_that_is_not_there_is_named(tmp_path: Path) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    err = io.StringIO()
    code = client.run(args_for(tmp_path), client=served(httpx.MockTransport(refuse)), out=io.StringIO(), err=err)
    assert code == 1 and "cannot reach the gateway at http://gateway.test" in err.getvalue()


def test_a_missing_edit_file_is_refused_before_any_call(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []
    code, _, err = run(args_for(tmp_path, edit=[tmp_path / "nope.png"]), httpx.Response(200), seen)
    assert code == 1 and seen == [] and "nope.png: no such file" in err


def test_the_url_and_key_come_from_the_environment_when_not_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLEIN_URL", "http://elsewhere.test:9000/")
    monkeypatch.setenv("KLEIN_API_KEY", "sk-env")
    seen: list[httpx.Request] = []
    run(args_for(tmp_path, url=None, key=None), httpx.Response(200, content=sse(("image_generation.completed", COMPLETED))), seen)
    assert str(seen[0].url) == "http://elsewhere.test:9000/v1/images/generations"
    assert seen[0].headers["authorization"] == "Bearer sk-env"
