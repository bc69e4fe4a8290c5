"""`klein-gateway batch submit|status|cancel`: a batch on a running gateway, with a progress line.

A client of the gateway's Batch API, not of its internals: `submit` uploads
the JSONL file (`/v1/files`, purpose batch), makes the batch and prints its
id; with `--wait` (and `status --wait`) it follows the batch object, one line
on stderr rewritten as it changes (done, failed, local and hosted lines, the
spend and the forecast), until the batch ends, then prints the summary and
the output and error file ids on stdout. Where: `--url`, else `KLEIN_URL`;
the key `--key`, else `KLEIN_API_KEY`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import httpx

from gateway.client import add_where, error_text, where

ENDED = ("completed", "failed", "expired", "cancelled")
POLL_S = 1.0


def progress_line(batch: dict[str, Any]) -> str:
    """What the progress line says of a batch object; pure, so it is tested as text."""
    counts = batch.get("request_counts") or {}
    klein = batch.get("klein") or {}
    parts = [str(batch.get("status")), f"{counts.get('completed', 0)}/{counts.get('total', 0)} done", f"{counts.get('failed', 0)} failed"]
    parts.append(f"local {klein.get('lines_local', 0)}, hosted {klein.get('lines_hosted', 0)}")
    parts.append(f"${klein.get('spent_usd', '0')} spent")
    forecast = klein.get("forecast") or {}
    if forecast.get("cost_usd") is not None and batch.get("status") not in ENDED:
        finish = time.strftime("%H:%M", time.localtime(forecast["finish_at"])) if forecast.get("finish_at") else "?"
        parts.append(f"forecast ${forecast['cost_usd']} by {finish}")
    return " | ".join(parts)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("batch", help="submit, follow or cancel a batch on a running gateway")
    verbs = p.add_subparsers(dest="verb", required=True)
    submit = verbs.add_parser("submit", help="upload a JSONL file and make a batch of it")
    submit.add_argument("file", type=Path, help="JSONL: one {custom_id, method, url, body} a line")
    submit.add_argument("--endpoint", default="/v1/images/generations", choices=["/v1/images/generations", "/v1/images/edits"])
    submit.add_argument("--window", default="24h", help="completion window: 24h, or 5m to 24h (1h, 6h, 90m)")
    submit.add_argument("--wait", action="store_true", help="follow it to its end with a progress line")
    status = verbs.add_parser("status", help="a batch's state")
    status.add_argument("batch_id")
    status.add_argument("--wait", action="store_true", help="follow it to its end with a progress line")
    cancel = verbs.add_parser("cancel", help="stop a batch: no new line starts, running ones are settled")
    cancel.add_argument("batch_id")
    for verb in (submit, status, cancel):
        add_where(verb)
        verb.add_argument("--timeout", type=float, default=86_400.0, help="seconds --wait follows at most (default a day)")


class Failed(Exception):
    """What the command says on stderr before it exits 1."""


def run(args: argparse.Namespace, *, client: httpx.Client | None = None, out: TextIO | None = None, err: TextIO | None = None, poll_s: float = POLL_S) -> int:
    out, err = out or sys.stdout, err or sys.stderr  # read at the call: a redirected stream is the one written to
    url, key = where(args)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    own = client is None
    http = client or httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0), headers=headers)
    if not own:
        http.headers.update(headers)
    try:
        if args.verb == "submit":
            batch = _submit(http, url, args)
            print(f"batch {batch['id']}: {progress_line(batch)}", file=err)
        elif args.verb == "cancel":
            batch = _call(http, "POST", f"{url}/v1/batches/{args.batch_id}/cancel")
        else:
            batch = _call(http, "GET", f"{url}/v1/batches/{args.batch_id}")
        if getattr(args, "wait", False):
            batch = _follow(http, url, batch, timeout=args.timeout, err=err, poll_s=poll_s)
        files = f"output {batch.get('output_file_id') or '-'}, errors {batch.get('error_file_id') or '-'}"
        print(f"{batch['id']} {progress_line(batch)} | {files}", file=out)
        return 0
    except Failed as exc:
        print(f"error: {exc}", file=err)
        return 1
    except httpx.ConnectError:
        print(f"error: cannot reach the gateway at {url}: is `klein-gateway serve` running there?", file=err)
        return 1
    finally:
        if own:
            http.close()


def _submit(http: httpx.Client, url: str, args: argparse.Namespace) -> dict[str, Any]:
    path: Path = args.file
    if not path.is_file():
        raise Failed(f"{path}: no such file")
    with path.open("rb") as f:
        uploaded = _call(http, "POST", f"{url}/v1/files", files={"file": (path.name, f)}, data={"purpose": "batch"})
    return _call(http, "POST", f"{url}/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": args.endpoint, "completion_window": args.window})


def _follow(http: httpx.Client, url: str, batch: dict[str, Any], *, timeout: float, err: TextIO, poll_s: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    shown = ""
    while batch.get("status") not in ENDED:
        if time.monotonic() > end:
            raise Failed(f"batch {batch['id']} is still {batch.get('status')} after {timeout:g}s")
        line = progress_line(batch)
        if line != shown:
            print(f"\r\x1b[2K{line}", end="", file=err, flush=True)
            shown = line
        time.sleep(poll_s)
        batch = _call(http, "GET", f"{url}/v1/batches/{batch['id']}")
    if shown:
        print(file=err)
    return batch


def _call(http: httpx.Client, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
    response = http.request(method, url, **kwargs)
    if response.status_code != 200:
        raise Failed(error_text(response))
    body: dict[str, Any] = response.json()
    return body
