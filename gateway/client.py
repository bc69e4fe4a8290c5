"""`klein-gateway generate`: one image from a running gateway, streamed, with a progress line.

The command is a client of the gateway's own OpenAI surface, not of its
internals: it POSTs `/v1/images/generations` (or `/v1/images/edits` with
`--edit` files) with `stream: true`, reads the server-sent events as the
OpenAI SDKs do (`image_generation.partial_image`, `image_generation.completed`,
`image_edit.*`, `error`), and shows on stderr one line that it rewrites: the
backend and price once known, the provider's progress (SSE comments, which
the SDKs ignore), the previews received and the time so far. It writes the
final image to `--out` and prints one summary line on stdout.

Where: `--url`, else `KLEIN_URL`, else http://127.0.0.1:8080; the caller key
`--key`, else `KLEIN_API_KEY`, else none (an open gateway).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
COMPLETED = ("image_generation.completed", "image_edit.completed")
PARTIAL = ("image_generation.partial_image", "image_edit.partial_image")


@dataclass(frozen=True, slots=True)
class Event:
    """One server-sent event: `kind` is its `event:` name, or "comment" for a `:` line."""

    kind: str | None
    data: str


def parse_sse(lines: Iterable[str]) -> Iterator[Event]:
    """Server-sent events from the stream's lines (https://html.spec.whatwg.org/multipage/server-sent-events.html).

    A blank line ends an event; `data:` lines join with newlines; a line
    starting with `:` is a comment, yielded on its own so progress can be shown."""
    kind: str | None = None
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield Event(kind, "\n".join(data))
            kind, data = None, []
            continue
        if line.startswith(":"):
            yield Event("comment", line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
    if data:
        yield Event(kind, "\n".join(data))


@dataclass
class Progress:
    """What the progress line says; `render` is pure, so it is tested as text."""

    started: float
    backend: str | None = None
    price: str | None = None
    status: str = "submitted"
    previews: int = 0
    previews_asked: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def render(self, now: float) -> str:
        parts = [f"{now - self.started:5.1f}s", self.status]
        if self.backend:
            parts.append(f"on {self.backend}")
        if self.price:
            parts.append(f"${self.price}")
        if self.previews_asked:
            parts.append(f"previews {self.previews}/{self.previews_asked}")
        return " | ".join(parts)


def add_where(parser: Any) -> None:
    """`--url` and `--key`, as every command that calls a running gateway takes them."""
    parser.add_argument("--url", default=None, help=f"the gateway (default $KLEIN_URL, else {DEFAULT_URL})")
    parser.add_argument("--key", default=None, help="the caller key (default $KLEIN_API_KEY)")


def where(args: argparse.Namespace) -> tuple[str, str | None]:
    """The gateway's URL and the caller key: the flags, else the environment, else the defaults."""
    return (args.url or os.environ.get("KLEIN_URL") or DEFAULT_URL).rstrip("/"), args.key or os.environ.get("KLEIN_API_KEY")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate one image on a running gateway, with a progress line")
    p.add_argument("prompt")
    p.add_argument("--size", default="1024x1024", help="WxH (default 1024x1024)")
    p.add_argument("--out", type=Path, default=None, help="where to write the image (default klein-<time>.<format>)")
    p.add_argument("--edit", type=Path, action="append", default=[], metavar="IMAGE", help="a reference image (up to 4): makes it an edit")
    p.add_argument("--format", dest="output_format", choices=["png", "jpeg", "webp"], default="png")
    p.add_argument("--partial-images", type=int, choices=[0, 1, 2, 3], default=2, help="previews to ask for (the local backend sends real ones)")
    p.add_argument("--model", default="flux-2-klein-4b", help="a `backend/` prefix pins one backend, e.g. fal/flux-2-klein-4b")
    add_where(p)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait in all (default 600)")


def run(args: argparse.Namespace, *, client: httpx.Client | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr, clock: Any = time.monotonic) -> int:
    """The `generate` command: 0 with the image written, 1 with the reason on stderr."""
    url, key = where(args)
    headers = {"accept": "text/event-stream"} | ({"authorization": f"Bearer {key}"} if key else {})
    fields = {"model": args.model, "prompt": args.prompt, "size": args.size, "output_format": args.output_format, "response_format": "b64_json", "stream": True, "partial_images": args.partial_images}
    for path in args.edit:
        if not path.is_file():
            print(f"error: {path}: no such file", file=err)
            return 1
    own = client is None
    http = client or httpx.Client(timeout=httpx.Timeout(args.timeout, connect=10.0))
    progress = Progress(started=clock(), previews_asked=args.partial_images)
    try:
        with _request(http, url, fields, args.edit, headers) as response:
            if response.status_code != 200:
                response.read()
                print(f"error: {error_text(response)}", file=err)
                return 1
            progress.backend = response.headers.get("x-klein-planned-backend")  # the plan's first choice, before any failover
            progress.price = response.headers.get("x-klein-quote-usd")
            return _follow(response.iter_lines(), args, progress, out=out, err=err, clock=clock)
    except httpx.ConnectError:
        print(f"error: cannot reach the gateway at {url}: is `klein-gateway serve` running there?", file=err)
        return 1
    except httpx.TimeoutException:
        print(f"error: no answer from {url} within {args.timeout:g}s", file=err)
        return 1
    finally:
        if own:
            http.close()


def _request(http: httpx.Client, url: str, fields: dict[str, Any], edits: list[Path], headers: dict[str, str]) -> Any:
    if not edits:
        return http.stream("POST", f"{url}/v1/images/generations", json=fields, headers=headers)
    form = {k: json.dumps(v) if isinstance(v, bool) else str(v) for k, v in fields.items()}
    files = [("image[]", (p.name, p.read_bytes(), _media_type(p))) for p in edits]
    return http.stream("POST", f"{url}/v1/images/edits", data=form, files=files, headers=headers)


def _follow(lines: Iterable[str], args: argparse.Namespace, progress: Progress, *, out: TextIO, err: TextIO, clock: Any) -> int:
    line_shown = False

    def show() -> None:
        nonlocal line_shown
        print("\r" + progress.render(clock()).ljust(72), end="", file=err, flush=True)
        line_shown = True

    def done_line() -> None:
        if line_shown:
            print(file=err)

    show()
    for event in parse_sse(lines):
        if event.kind == "comment":
            if event.data.startswith("progress"):
                progress.status = status_text(event.data.removeprefix("progress").strip(" :")) or progress.status
                show()
            continue
        try:
            payload = json.loads(event.data)
        except ValueError:
            continue
        kind = event.kind or payload.get("type")
        if kind in PARTIAL:
            progress.previews += 1
            progress.status = "previews arriving"
            show()
        elif kind in COMPLETED:
            done_line()
            return _write(payload, args, out=out, err=err)
        elif kind == "error" or "error" in payload:
            done_line()
            error = payload.get("error", payload)
            print(f"error: {error.get('message', 'the gateway reported an error')} ({error.get('code') or error.get('type') or 'error'})", file=err)
            return 1
        elif isinstance(payload.get("status"), str):  # a progress event the SDKs skip: the provider's status
            progress.status = payload["status"]
            show()
    done_line()
    print("error: the stream ended before the image was completed", file=err)
    return 1


def _write(payload: dict[str, Any], args: argparse.Namespace, *, out: TextIO, err: TextIO) -> int:
    data = payload.get("b64_json")
    if not data:
        print("error: the completed event carried no image", file=err)
        return 1
    fmt = payload.get("output_format") or args.output_format
    path = args.out or Path(f"klein-{time.strftime('%Y%m%d-%H%M%S')}.{'jpg' if fmt == 'jpeg' else fmt}")
    path.write_bytes(base64.b64decode(data))
    klein = payload.get("klein") or {}
    figures = [payload.get("size") or args.size]
    if klein.get("backend"):
        figures.append(str(klein["backend"]))
    if klein.get("cost_usd") is not None:
        figures.append(f"${klein['cost_usd']}")
    if klein.get("attempts") is not None:
        figures.append(f"{klein['attempts']} attempt{'s' if klein['attempts'] != 1 else ''}")
    print(f"wrote {path} ({', '.join(figures)})", file=out)
    return 0


def status_text(said: str) -> str:
    """A provider's progress as the line shows it: `{"status": "IN_QUEUE", "queue_position": 2}` -> "IN_QUEUE (position 2)"."""
    try:
        fields = json.loads(said)
    except ValueError:
        return said
    if not isinstance(fields, dict) or not isinstance(fields.get("status"), str):
        return said
    position = fields.get("queue_position")
    return f"{fields['status']} (position {position})" if isinstance(position, int) else fields["status"]


def error_text(response: httpx.Response) -> str:
    """The OpenAI envelope's message and code, or the status when the body is not one."""
    try:
        error = response.json()["error"]
        return f"{error['message']} ({error.get('code') or error.get('type')}, HTTP {response.status_code})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code} from the gateway"


def _media_type(path: Path) -> str:
    return {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(path.suffix.lower(), "application/octet-stream")
