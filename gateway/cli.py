"""`klein-gateway`: serve, quote, check-config, init, keys, usage.

Every command finds its providers.yaml the same way: `--config`, else
`KLEIN_CONFIG`, else `./providers.yaml`, else the defaults shipped in the
package (`gateway.config.find_config`); `init` writes an editable copy of
those defaults."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import batch_client, client
from gateway.config import CONFIG_ENV, CONFIG_NAME, ConfigError, GatewaySettings, find_config, load_config, shipped_config
from gateway.domain.callers import LABEL_SECRET_ENV
from gateway.images import open_image_store
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.domain.job import ImageJob
    from gateway.service import Gateway
    from tests.emulators.launcher import EmulatorFleet


def _emulator_launcher() -> Any:
    """The emulators' launcher. They live beside the tests, outside the installed
    package, so a source checkout's root is put on the path when it is not there."""
    ours = ("tests", "tests.emulators", "tests.emulators.launcher")
    try:
        return importlib.import_module("tests.emulators.launcher")
    except ModuleNotFoundError as exc:
        if exc.name not in ours:
            raise
    root = Path(__file__).resolve().parents[1]
    if not (root / "tests" / "emulators" / "launcher.py").is_file():
        print("klein-gateway: --emulate needs a source checkout (pip install -e '.[dev]'): the emulators live in its tests/emulators", file=sys.stderr)
        return None
    sys.path.insert(0, str(root))
    return importlib.import_module("tests.emulators.launcher")


def _emulator_ports(spec: str | None, emulated: list[str]) -> tuple[int, dict[str, int]]:
    """`--emulator-ports`: (first of consecutive ports, 0 if none) and name=port pairs."""
    if not spec:
        return 0, {}
    if spec.strip().isdigit():
        first = int(spec)
        if not 1 <= first <= 65535 - len(emulated):
            raise ValueError(f"{first} leaves no room for {len(emulated)} consecutive ports")
        return first, {}
    ports: dict[str, int] = {}
    for pair in spec.split(","):
        name, sep, port = pair.strip().partition("=")
        if not sep or not port.strip().isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{pair.strip()!r} is not name=port")
        if name.strip() not in emulated:
            raise ValueError(f"{name.strip()!r} is not an emulated backend ({', '.join(emulated) or 'none'})")
        ports[name.strip()] = int(port)
    return 0, ports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="klein-gateway", description="OpenAI-compatible, cost-routing gateway for FLUX.2 [klein] 4B")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the gateway")
    _config_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument(
        "--workers", type=int, default=None,
        help="worker processes (default: one without REDIS_URL, else the CPUs this process may run on; metrics stay correct: PROMETHEUS_MULTIPROC_DIR is set for you)",
    )  # fmt: skip
    serve.add_argument(
        "--allow-unshared-state", action="store_true",
        help="let --workers N run without REDIS_URL: each worker then keeps its own idempotency keys, rate limits, budgets, breakers and jobs, so those guarantees no longer hold",
    )  # fmt: skip
    serve.add_argument("--emulate", action="store_true", help="start every provider's emulator on loopback and route to them (no keys needed; a source checkout's tests/emulators)")
    serve.add_argument(
        "--emulator-ports", default=None, metavar="SPEC",
        help="with --emulate: the first of consecutive ports (9100), or name=port pairs (fal=9101,local=9105); default free ports",
    )  # fmt: skip
    serve.add_argument("--log-level", default="info")
    serve.add_argument(
        "--metrics-port", type=int, default=None,
        help="serve /metrics on this port only, not on --port (default: $KLEIN_METRICS_PORT); $KLEIN_METRICS_TOKEN still applies",
    )  # fmt: skip
    serve.add_argument("--metrics-host", default=None, help="address for --metrics-port (default: --host)")

    quote = sub.add_parser("quote", help="print every backend's price for a request")
    _config_args(quote)
    quote.add_argument("--size", default=None, help="exact WIDTHxHEIGHT (default 1024x1024)")
    quote.add_argument("--aspect-ratio", default=None, help="a shape such as 16:9 instead of a size: each backend is priced at its native size near it")
    quote.add_argument("--n", type=int, default=1)
    quote.add_argument("--steps", type=int, default=4)
    quote.add_argument("--edit-images", type=int, default=0, help="quote an edit with this many reference images")

    check = sub.add_parser("check-config", help="validate providers.yaml, pricing/ and the keys file")
    _config_args(check)
    check.add_argument("--keys-file", default=Settings.from_env().keys_file, help="the keys file to validate (default: KLEIN_KEYS_FILE)")

    keys = sub.add_parser("keys", help="caller keys for KLEIN_KEYS_FILE")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="print a fresh key and the keys-file entry that admits it")
    new.add_argument("name")

    usage = sub.add_parser("usage", help="spend, images and requests from the usage ledger")
    _config_args(usage)
    usage.add_argument("--since", default="7d", help="how far back: 90m, 24h, 7d, or an ISO-8601 date")
    usage.add_argument("--until", default=None, help="end (ISO-8601); default now")
    usage.add_argument("--group-by", default="key,backend,day")
    usage.add_argument("--key", default=None, help="only this key's usage")

    init = sub.add_parser("init", help="write an editable copy of the shipped providers.yaml and pricing/")
    init.add_argument("dir", nargs="?", default=".", help="where to write them (default: the current directory)")
    init.add_argument("--force", action="store_true", help="overwrite files that are already there")

    client.add_parser(sub)
    batch_client.add_parser(sub)

    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return client.run(args)
        if args.command == "batch":
            return batch_client.run(args)
        if args.command == "init":
            return init_config(Path(args.dir), force=args.force)
        if args.command == "check-config":
            return check_config(args)
        if args.command == "keys":
            return new_key_command(args)
        if args.command == "usage":
            return print_usage(args)
        if args.command == "quote":
            return print_quote(args)
        return serve_gateway(args)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    except UnsharedStateError as exc:
        print(f"klein-gateway: {exc}", file=sys.stderr)
        return 2


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH", help=f"providers.yaml to use (default: ${CONFIG_ENV}, else ./{CONFIG_NAME}, else the defaults shipped with the package)")
    p.add_argument("--pricing", default=Settings.from_env().pricing, help="price sheet directory (default: pricing/ beside the config)")


def check_config(args: argparse.Namespace) -> int:
    config = load_config(_config_path(args), args.pricing)
    for b in config.backends:
        state = "enabled" if b.enabled else f"disabled ({b.disabled_reason})"
        print(f"{b.name:<12} {b.config.kind:<12} {b.sheet.basis:<17} {state}")
    if args.keys_file:
        from gateway.money.keys import KeysFileError, load_keys_file

        try:
            parsed = load_keys_file(args.keys_file, {b.name for b in config.backends})
        except KeysFileError as exc:
            raise ConfigError(str(exc)) from None
        for spec in parsed.keys:
            budget = ", ".join(f"{w} ${v}" for w, v in spec.budget_usd.windows()) or "no budget"
            print(f"key {spec.name:<20} {budget}{' (admin)' if spec.admin else ''}")
        print(f"ok: {args.keys_file} is valid ({len(parsed.keys)} keys)")
    print(f"ok: {config.path} and {config.pricing_dir}/ are valid")
    return 0


def _config_path(args: argparse.Namespace) -> Path:
    return find_config(args.config)


def init_config(target: Path, *, force: bool = False) -> int:
    """Copy the shipped providers.yaml and pricing/*.yaml into `target`.

    Every destination is checked before anything is written, so a refusal
    leaves the directory as it was."""
    source = shipped_config()
    sheets = sorted((source.parent / "pricing").glob("*.yaml"))
    copies = [(source, target / CONFIG_NAME)] + [(sheet, target / "pricing" / sheet.name) for sheet in sheets]
    existing = [str(dest) for _, dest in copies if dest.exists()]
    if existing and not force:
        print(f"init: not overwriting {', '.join(existing)} (use --force to replace them)", file=sys.stderr)
        return 1
    (target / "pricing").mkdir(parents=True, exist_ok=True)
    for src, dest in copies:
        shutil.copyfile(src, dest)
    print(f"wrote {target / CONFIG_NAME} and {len(sheets)} price sheets in {target / 'pricing'}/")
    where = "" if target.resolve() == Path.cwd().resolve() else f" --config {target / CONFIG_NAME}"
    print(f"edit them, then: klein-gateway check-config{where}")
    return 0


def new_key_command(args: argparse.Namespace) -> int:
    from gateway.money.keys import new_key

    try:
        secret, entry = new_key(args.name)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"key (give it to the caller; it is not stored anywhere): {secret}")
    print("add this entry under `keys:` in the keys file (KLEIN_KEYS_FILE):")
    print(entry, end="")
    return 0


def parse_since(text: str, now: datetime) -> datetime:
    """`90m`, `24h`, `7d`, `2w` back from now, or an ISO-8601 date or time (UTC)."""
    units = {"m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = text.strip()
    if text[:-1].isdigit() and text[-1:] in units:
        return now - timedelta(seconds=int(text[:-1]) * units[text[-1]])
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def print_usage(args: argparse.Namespace) -> int:
    """The same figures as GET /v1/usage, read from the ledger directly."""
    from gateway.domain.errors import GatewayError
    from gateway.http.usage import parse_group_by, report
    from gateway.money.ledger import open_store

    config = load_config(args.config, args.pricing)
    now = datetime.now(UTC)
    try:
        since = parse_since(args.since, now)
        until = parse_since(args.until, now) if args.until else now
        groups = parse_group_by(args.group_by)
    except (ValueError, GatewayError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    environment = Settings.from_env()
    path = environment.usage_ledger or config.settings.usage_ledger
    if not environment.database_url and not path:
        print("error: no ledger to read: set DATABASE_URL or gateway.usage_ledger in providers.yaml", file=sys.stderr)
        return 2
    if path and not Path(path).is_absolute():
        path = str(config.path.parent / path)
    store = open_store(environment.database_url or None, path)
    try:
        rows = store.fetch(since, until, args.key)
    finally:
        store.close()
    table = report(rows, groups, since, until)
    columns = [*groups, "requests", "images", "megapixels", "cost_usd", "billed_usd"]
    lines = [[str(item.get(c) if item.get(c) is not None else "-") for c in columns] for item in table["data"]]
    total = table["total"]
    lines.append(
        ["total", *[""] * (len(groups) - 1), *[str(total.get(c) if total.get(c) is not None else "-") for c in columns[len(groups) :]]] if groups else [str(total.get(c) or "-") for c in columns]
    )
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(columns)]
    print(f"usage {since.isoformat(timespec='seconds')} .. {until.isoformat(timespec='seconds')}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for line in lines:
        print("  ".join(v.ljust(w) if i < len(groups) else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths, strict=True))))
    return 0


def print_quote(args: argparse.Namespace) -> int:
    """The price table, computed offline from the sheets (no backend is called)."""
    from gateway.app import build_gateway
    from gateway.domain.errors import GatewayError
    from gateway.domain.job import JobKind, ReferenceImage
    from gateway.http.parse import build_job, parse_body

    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    env["KLEIN_USAGE_LEDGER"] = ":memory:"  # a quote runs nothing, so it records nothing
    config = load_config(_config_path(args), args.pricing, env)
    # A quote calls nothing, so a missing credential does not stop a backend being priced;
    # one disabled in providers.yaml, or with no address to serve from (the local GPU without
    # KLEIN_LOCAL_URL), could never be routed to and stays out, as the server would keep it.
    for b in config.backends:
        if b.disabled_reason and b.config.enabled and b.base_url:
            b.disabled_reason = None
    public_base_url = Settings.from_env(env).public_base_url
    if public_base_url:  # as the server does: uploads can then be lent a URL
        config.settings.public_base_url = public_base_url
    gw = build_gateway(config, env)
    refs = [ReferenceImage(content_type="image/png", data=b"", width=1024, height=1024)] * args.edit_images
    try:
        size = args.size or (None if args.aspect_ratio else "1024x1024")
        body = parse_body({"prompt": "quote", "size": size, "aspect_ratio": args.aspect_ratio, "n": args.n, "num_inference_steps": args.steps})
        job = build_job(
            body,
            kind=JobKind.EDIT if refs else JobKind.GENERATE,
            references=refs,
            max_prompt_chars=10,
            deadline_s=config.settings.default_deadline_s,
            caller=None,
            known_backends=gw.fleet.names,
            request_id="quote",
        )
    except GatewayError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    table = asyncio.run(_quote(gw, job))
    kind = f"edit with {args.edit_images} reference image(s)" if refs else "text-to-image"
    asked = f"aspect ratio {args.aspect_ratio} ({job.size})" if args.aspect_ratio and not args.size else job.size
    print(f"{asked} x{args.n}, {args.steps} steps, {kind}")
    print(f"{'backend':<12} {'size':<10} {'cost_usd':>12}  {'basis':<17} {'eligible':<8} reason")
    for row in table["backends"]:
        cost = f"{Decimal(row['cost_usd']):.8f}" if row["cost_usd"] is not None else "-"
        print(f"{row['name']:<12} {row.get('size') or '-':<10} {cost:>12}  {row['basis'] or '-':<17} {'yes' if row['eligible'] else 'no':<8} {row['reason']}")
    print(f"chosen: {table['chosen'] or 'none'}" + (f" at {table['chosen_size']}" if table.get("chosen_size") else ""))
    return 0


async def _quote(gw: Gateway, job: ImageJob) -> dict[str, Any]:
    try:
        return await gw.quote_table(job)
    finally:
        await gw.close()


def serve_gateway(args: argparse.Namespace) -> int:
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from gateway.observability.logs import configure_logging

    os.environ["KLEIN_LOG_LEVEL"] = args.log_level.upper()
    configure_logging(level=args.log_level.upper())
    path = _config_path(args)
    fleet, kept = None, {}
    images_dir: str | None = None
    if args.emulator_ports and not args.emulate:
        print("klein-gateway: --emulator-ports needs --emulate", file=sys.stderr)
        return 2
    if args.emulate:
        launcher = _emulator_launcher()
        if launcher is None:
            return 2
        kept = launcher.explicit_base_urls(os.environ)  # the user's own addresses win over emulators
        emulated = [name for name in launcher.PROVIDERS if name not in kept]
        try:
            first, ports = _emulator_ports(args.emulator_ports, emulated)
        except ValueError as exc:
            print(f"klein-gateway: --emulator-ports: {exc}", file=sys.stderr)
            return 2
        if emulated:
            fleet = launcher.EmulatorFleet.start_in_thread(emulated, ports={name: first + i for i, name in enumerate(emulated)} if first else ports)
            os.environ.update(fleet.env())
    try:
        args.workers = choose_workers(args.workers, shared=bool(Settings.from_env().redis_url), allow_unshared=args.allow_unshared_state)
        config = load_config(path, args.pricing)  # fail fast, with the field named, before binding a port
        os.environ[CONFIG_ENV] = str(config.path.resolve())  # every worker reads the same file
        if args.pricing:
            os.environ["KLEIN_PRICING"] = args.pricing
        os.environ["KLEIN_WORKERS"] = str(args.workers)
        images_dir = prepare_image_dir(config.settings, args.workers)
        open_image_store(config.settings, os.environ, workers=args.workers)  # the same checks every worker makes, once, before binding
        raise_open_file_limit()
        # Each worker drains on SIGTERM (gateway.dispatch.shutdown) before uvicorn stops it;
        # the extra seconds are uvicorn's backstop for connections still open then.
        grace = config.settings.shutdown_grace_s
        server_config = uvicorn.Config(
            "gateway.app:app_from_env",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level="warning",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=int(grace) + 5,
        )
        sock = server_config.bind_socket()  # exits non-zero, logging why, if the port is taken
        sock.listen(server_config.backlog)  # connections queue from here on, before the app is up
        metrics_port = resolve_metrics_port(args)
        # One caller-label secret for every worker, so their series agree (gateway.domain.callers).
        os.environ.setdefault(LABEL_SECRET_ENV, secrets.token_hex(32))
        metrics_dir = prepare_metrics_dir(args.workers, shared=metrics_port is not None)
        metrics_server = None
        if metrics_port is not None:
            from gateway.observability.metrics_access import MetricsAccess, serve_metrics

            shared_dir = Settings.from_env().prometheus_multiproc_dir
            assert shared_dir is not None  # prepare_metrics_dir named or made one (shared=True)
            metrics_server, _ = serve_metrics(args.metrics_host or args.host, metrics_port, MetricsAccess.from_env(os.environ), shared_dir)
    except BaseException:
        if fleet is not None:
            fleet.stop_thread()
        if images_dir is not None:
            shutil.rmtree(images_dir, ignore_errors=True)
        raise
    print(banner(args, fleet, kept), flush=True)  # the port is bound: the examples work from now on
    signal.signal(signal.SIGTERM, _exit_cleanly)
    server = uvicorn.Server(server_config)
    try:
        if args.workers > 1:
            Multiprocess(server_config, sockets=[sock]).run()
        else:
            server_config.load_app()
            server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        if fleet is not None:
            fleet.stop_thread()
        for made in (metrics_dir, images_dir):
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
    return 0 if server.started or args.workers > 1 else 3


def resolve_metrics_port(args: argparse.Namespace) -> int | None:
    """--metrics-port, else $KLEIN_METRICS_PORT; written back to the environment so
    every worker knows not to serve /metrics on the API port."""
    from gateway.observability.metrics_access import PORT_ENV, parse_port

    port = parse_port(args.metrics_port if args.metrics_port is not None else Settings.from_env().metrics_port)
    if port is not None:
        if port == args.port:
            raise ConfigError(f"--metrics-port {port} is the API port; pick another")
        os.environ[PORT_ENV] = str(port)
    return port


def _exit_cleanly(signum: int, frame: object) -> None:
    """SIGTERM once the drain is over (uvicorn re-raises it after shutting down): exit 0, cleaning up."""
    raise SystemExit(0)


def prepare_image_dir(settings: GatewaySettings, workers: int) -> str | None:
    """Several workers with no directory named share a fresh temporary one (removed at exit).

    Images then survive neither a restart nor another replica: name a
    directory (gateway.image_store.path, KLEIN_IMAGE_DIR) or use s3 for that."""
    environment = Settings.from_env()
    kind = environment.image_store or settings.image_store.kind
    if workers <= 1 or kind not in ("auto", "filesystem") or environment.image_dir or settings.image_store.path:
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


ONE_WORKER_NOTE = "one worker: state is in this process's memory; set REDIS_URL to run several"


class UnsharedStateError(ValueError):
    """Several workers asked for with nothing to share their state through."""


def choose_workers(requested: int | None, *, shared: bool, allow_unshared: bool = False) -> int:
    """How many workers `serve` runs.

    Idempotency keys, rate limits, budgets, breakers and jobs live in Redis
    when it is set, else in each process's memory; several processes would
    each keep their own copy and every promise would be kept per worker only.
    So without Redis the default is one worker, and more are refused unless
    the operator accepts that (`--allow-unshared-state`)."""
    if requested is None:
        return default_workers() if shared else 1
    if requested > 1 and not shared and not allow_unshared:
        raise UnsharedStateError(
            f"--workers {requested} without REDIS_URL would give each worker its own idempotency keys, rate limits, budgets, "
            "breakers and jobs, so none of them would hold across workers: set REDIS_URL, run one worker, "
            "or pass --allow-unshared-state to accept that"
        )
    return requested


def default_workers() -> int:
    """One worker per CPU this process may use: its affinity mask (a container's
    cpuset, `taskset`), not the machine's count, which can be far larger."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1)


def prepare_metrics_dir(workers: int, *, shared: bool = False) -> str | None:
    """Several workers share counters through PROMETHEUS_MULTIPROC_DIR; so do
    one worker and the separate metrics server (`shared`).

    A directory the user named is emptied of the previous run's files (they
    would be summed in); otherwise one is made, and returned so it is removed
    at exit."""
    given = Settings.from_env().prometheus_multiproc_dir
    if given:
        for stale in Path(given).glob("*.db"):
            stale.unlink(missing_ok=True)
        return None
    if workers <= 1 and not shared:
        return None
    made = tempfile.mkdtemp(prefix="klein-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    return made


def banner(args: argparse.Namespace, fleet: EmulatorFleet | None, kept: dict[str, str] | None = None) -> str:
    """What is serving where, and examples that work as printed.

    With KLEIN_GATEWAY_KEYS set, each example sends the first key, read from
    the shell's environment when it runs: the banner never prints a key."""
    from gateway.providers import adapter_class
    from gateway.redaction import redact

    url = f"http://{args.host}:{args.port}/v1"
    lines = [f"Klein Gateway on {url}"]
    if getattr(args, "workers", None) == 1 and not Settings.from_env().redis_url:
        lines.append(ONE_WORKER_NOTE)
    if fleet is not None:
        lines.append("Emulated backends on loopback, no keys needed (knobs: POST <emulator>/_admin/knobs):")
        for name, running in sorted(fleet.emulators.items()):
            lines.append(f"  {name:<12} {running.base_url}")
    for name, address in sorted((kept or {}).items()):
        lines.append(f"Not emulated: {name} at {redact(address)} ({adapter_class(name).base_url_env} is set)")
    environment = Settings.from_env()
    if environment.gateway_keys:
        auth = ' -H "authorization: Bearer ${KLEIN_GATEWAY_KEYS%%,*}"'
        api_key = "__import__('os').environ['KLEIN_GATEWAY_KEYS'].split(',')[0]"
    elif environment.keys_file:  # keys from the file: put one of yours in $KLEIN_KEY to run the examples
        auth = ' -H "authorization: Bearer $KLEIN_KEY"'
        api_key = "__import__('os').environ['KLEIN_KEY']"
    else:
        auth, api_key = "", "'any'"
    lines += [
        "",
        "Try it:",
        f'  curl -s {url}/images/quote{auth} -H \'content-type: application/json\' -d \'{{"prompt": "a lighthouse", "size": "1024x1024"}}\'',
        f'  curl -s {url}/images/generations{auth} -H \'content-type: application/json\' -d \'{{"prompt": "a lighthouse", "size": "512x512", "response_format": "b64_json"}}\' -D - -o /dev/null',
        "  python -c \"from openai import OpenAI; c = OpenAI(base_url='" + url + "', api_key=" + api_key + "); "
        "print(c.images.generate(model='flux-2-klein-4b', prompt='a lighthouse', size='512x512').data[0].url)\"",
        f"  curl -s {url}/backends{auth} | python -m json.tool",
        f"Metrics: {metrics_url(args)}",
    ]
    return "\n".join(lines)


def metrics_url(args: argparse.Namespace) -> str:
    environment = Settings.from_env()
    port = environment.metrics_port
    url = f"http://{getattr(args, 'metrics_host', None) or args.host}:{port}/metrics" if port else f"http://{args.host}:{args.port}/metrics"
    return url + (" (Authorization: Bearer $KLEIN_METRICS_TOKEN)" if environment.metrics_token else "")


if __name__ == "__main__":
    sys.exit(main())
