"""`klein-gateway`: serve, quote, check-config."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
from decimal import Decimal
from pathlib import Path

from gateway.config import ConfigError, GatewaySettings, load_config
from gateway.images import open_image_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="klein-gateway", description="OpenAI-compatible, cost-routing gateway for FLUX.2 [klein] 4B")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the gateway")
    _config_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1, help="worker processes (metrics stay correct: PROMETHEUS_MULTIPROC_DIR is set for you)")
    serve.add_argument("--emulate", action="store_true", help="start every provider's emulator on loopback and route to them (no keys needed)")
    serve.add_argument("--log-level", default="info")

    quote = sub.add_parser("quote", help="print every backend's price for a request")
    _config_args(quote)
    quote.add_argument("--size", default="1024x1024")
    quote.add_argument("--n", type=int, default=1)
    quote.add_argument("--steps", type=int, default=4)
    quote.add_argument("--edit-images", type=int, default=0, help="quote an edit with this many reference images")

    check = sub.add_parser("check-config", help="validate providers.yaml and pricing/")
    _config_args(check)

    args = parser.parse_args(argv)
    try:
        if args.command == "check-config":
            return check_config(args)
        if args.command == "quote":
            return print_quote(args)
        return serve_gateway(args)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=os.environ.get("KLEIN_CONFIG", "providers.yaml"))
    p.add_argument("--pricing", default=os.environ.get("KLEIN_PRICING"), help="price sheet directory (default: pricing/ beside the config)")


def check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.pricing)
    for b in config.backends:
        state = "enabled" if b.enabled else f"disabled ({b.disabled_reason})"
        print(f"{b.name:<12} {b.config.kind:<12} {b.sheet.basis:<17} {state}")
    print(f"ok: {args.config} and {config.pricing_dir}/ are valid")
    return 0


def print_quote(args: argparse.Namespace) -> int:
    """The price table, computed offline from the sheets (no backend is called)."""
    from gateway.app import build_gateway
    from gateway.api.parse import build_job, parse_body
    from gateway.errors import GatewayError
    from gateway.job import JobKind, ReferenceImage

    env = dict(os.environ)
    config = load_config(args.config, args.pricing, env)
    # Price every configured backend, credentials or not: a quote calls nothing.
    for b in config.backends:
        if b.disabled_reason and b.config.enabled:
            b.disabled_reason = None
            b.base_url = b.base_url or "http://unused.invalid"
    gw = build_gateway(config, env)
    refs = [ReferenceImage(content_type="image/png", data=b"", width=1024, height=1024)] * args.edit_images
    try:
        body = parse_body({"prompt": "quote", "size": args.size, "n": args.n, "num_inference_steps": args.steps})
        job = build_job(body, kind=JobKind.EDIT if refs else JobKind.GENERATE, references=refs, max_prompt_chars=10, deadline_s=config.settings.default_deadline_s, caller=None, known_backends=gw.fleet.names, request_id="quote")
    except GatewayError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    table = asyncio.run(_quote(gw, job))
    kind = f"edit with {args.edit_images} reference image(s)" if refs else "text-to-image"
    print(f"{args.size} x{args.n}, {args.steps} steps, {kind}")
    print(f"{'backend':<12} {'cost_usd':>12}  {'basis':<17} {'eligible':<8} reason")
    for row in table["backends"]:
        cost = f"{Decimal(row['cost_usd']):.8f}" if row["cost_usd"] is not None else "-"
        print(f"{row['name']:<12} {cost:>12}  {row['basis'] or '-':<17} {'yes' if row['eligible'] else 'no':<8} {row['reason']}")
    print(f"chosen: {table['chosen'] or 'none'}")
    return 0


async def _quote(gw, job):  # type: ignore[no-untyped-def]
    try:
        return await gw.quote_table(job)
    finally:
        await gw.close()


def serve_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.logs import configure_logging

    fleet = None
    if args.emulate:
        from gateway.emulators.launcher import EmulatorFleet

        fleet = EmulatorFleet.start_in_thread()
        os.environ.update(fleet.env())
    os.environ["KLEIN_LOG_LEVEL"] = args.log_level.upper()
    configure_logging(level=args.log_level.upper())
    config = load_config(args.config, args.pricing)  # fail fast, with the field named, before binding a port
    os.environ["KLEIN_CONFIG"] = str(Path(args.config))
    if args.pricing:
        os.environ["KLEIN_PRICING"] = args.pricing
    os.environ["KLEIN_WORKERS"] = str(args.workers)
    images_dir = prepare_image_dir(config.settings, args.workers)
    try:
        open_image_store(config.settings, os.environ, workers=args.workers)  # the same checks every worker makes, once, before binding
    except ConfigError:
        if images_dir is not None:
            shutil.rmtree(images_dir, ignore_errors=True)
        raise
    raise_open_file_limit()
    metrics_dir = prepare_metrics_dir(args.workers)
    print(banner(args, fleet), flush=True)
    # Each worker drains on SIGTERM (gateway.shutdown) before uvicorn stops it;
    # the extra seconds are uvicorn's backstop for connections still open then.
    grace = config.settings.shutdown_grace_s
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        uvicorn.run(
            "gateway.app:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers,
            log_level="warning", access_log=False, log_config=None, timeout_graceful_shutdown=int(grace) + 5,
        )
    finally:
        if fleet is not None:
            fleet.stop_thread()
        for made in (metrics_dir, images_dir):
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
    return 0


def _exit_cleanly(signum: int, frame: object) -> None:
    """SIGTERM once the drain is over (uvicorn re-raises it after shutting down): exit 0, cleaning up."""
    raise SystemExit(0)


def prepare_image_dir(settings: GatewaySettings, workers: int) -> str | None:
    """Several workers with no directory named share a fresh temporary one (removed at exit).

    Images then survive neither a restart nor another replica: name a
    directory (gateway.image_store.path, KLEIN_IMAGE_DIR) or use s3 for that."""
    kind = os.environ.get("KLEIN_IMAGE_STORE") or settings.image_store.kind
    if workers <= 1 or kind not in ("auto", "filesystem") or os.environ.get("KLEIN_IMAGE_DIR") or settings.image_store.path:
        return None
    made = tempfile.mkdtemp(prefix="klein-images-")
    os.environ["KLEIN_IMAGE_DIR"] = made
    return made


def raise_open_file_limit() -> None:
    """Each request in flight holds about two sockets; let the soft limit go up to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))
    except (ImportError, ValueError, OSError):
        pass


def prepare_metrics_dir(workers: int) -> str | None:
    """Several workers share counters through PROMETHEUS_MULTIPROC_DIR.

    A directory the user named is emptied of the previous run's files (they
    would be summed in); otherwise one is made, and returned so it is removed
    at exit."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        for stale in Path(given).glob("*.db"):
            stale.unlink(missing_ok=True)
        return None
    if workers <= 1:
        return None
    made = tempfile.mkdtemp(prefix="klein-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    return made


def banner(args: argparse.Namespace, fleet: object | None) -> str:
    url = f"http://{args.host}:{args.port}/v1"
    lines = [f"Klein Gateway on {url}"]
    if fleet is not None:
        lines.append("Emulated backends on loopback, no keys needed (knobs: POST <emulator>/_admin/knobs):")
        for name, running in sorted(fleet.emulators.items()):  # type: ignore[attr-defined]
            lines.append(f"  {name:<12} {running.base_url}")
    key_hint = "any" if not os.environ.get("KLEIN_GATEWAY_KEYS") else "<a key from KLEIN_GATEWAY_KEYS>"
    lines += [
        "",
        "Try it:",
        f"  curl -s {url}/images/quote -H 'content-type: application/json' -d '{{\"prompt\": \"a lighthouse\", \"size\": \"1024x1024\"}}'",
        f"  curl -s {url}/images/generations -H 'content-type: application/json' -d '{{\"prompt\": \"a lighthouse\", \"size\": \"512x512\", \"response_format\": \"b64_json\"}}' -D - -o /dev/null",
        "  python -c \"from openai import OpenAI; c = OpenAI(base_url='" + url + "', api_key='" + key_hint + "'); "
        "print(c.images.generate(model='flux-2-klein-4b', prompt='a lighthouse', size='512x512').data[0].url)\"",
        f"  curl -s {url}/backends | python -m json.tool",
        f"Metrics: http://{args.host}:{args.port}/metrics",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
