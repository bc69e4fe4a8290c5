"""`klein-local serve --model PATH | --tiny [options]`.

Flags override `KLEIN_LOCAL_<FIELD>` environment variables (see
`local_backend.config`). One process serves one device with one worker
thread; scale by running one process per GPU, not by uvicorn workers.

Before binding a port, `serve` checks what would otherwise only fail in the
background after start-up (a process alive but never ready): that torch and
diffusers import, and that `--model` is a diffusers folder of the pipeline.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from local_backend.config import Settings, load_settings

_FLAG_TO_FIELD = {
    "model": "model_path",
    "tiny": "tiny",
    "device": "device",
    "dtype": "dtype",
    "host": "host",
    "port": "port",
    "max_batch_images": "max_batch_images",
    "max_batch_megapixels": "max_batch_pixels",
    "max_queue": "max_queue",
    "max_queue_megapixels": "max_queue_megapixels",
    "batch_delay_ms": "batch_delay_ms",
    "request_timeout_s": "request_timeout_s",
    "max_pixels": "max_pixels",
    "max_steps": "max_steps",
    "buckets": "buckets",
    "warmup": "warmup",
    "warmup_sizes": "warmup_sizes",
    "compile": "compile",
    "gpu_usd_per_hour": "gpu_usd_per_hour",
    "safety": "safety",
    "safety_model": "safety_model_path",
    "safety_threshold": "safety_threshold",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="klein-local", description="Local GPU backend for FLUX.2 [klein] 4B")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve one pipeline over HTTP")
    source = serve.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="PATH", help="local diffusers folder of FLUX.2-klein-4B (never downloaded)")
    source.add_argument("--tiny", action="store_true", default=None, help="a tiny random pipeline built in code")
    serve.add_argument("--device", help="cuda, cuda:1, cpu, or auto (default)")
    serve.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"])
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="default 8090")
    serve.add_argument("--max-batch-images", type=int, help="images per pipeline call, at most (default 8)")
    serve.add_argument("--max-batch-megapixels", type=float, help="megapixels per pipeline call, at most (default 4.19)")
    serve.add_argument("--max-queue", type=int, help="queued requests before 429 (default 32)")
    serve.add_argument("--max-queue-megapixels", type=float, help="queued output megapixels before 429")
    serve.add_argument("--batch-delay-ms", type=float, help="how long the oldest request waits for company (default 10)")
    serve.add_argument("--request-timeout-s", type=float, help="deadline for requests that set none (default 60)")
    serve.add_argument("--max-pixels", type=int, help="pixels per image, at most (default 2048*2048)")
    serve.add_argument("--max-steps", type=int, help="num_inference_steps, at most (default 50)")
    serve.add_argument("--buckets", help="comma-separated sizes for warm-up and speed figures (default fal's presets)")
    serve.add_argument("--warmup-sizes", help="sizes to warm up (default: the buckets)")
    serve.add_argument("--no-warmup", dest="warmup", action="store_false", default=None, help="ready without warm-up")
    serve.add_argument("--compile", action="store_true", default=None, help="torch.compile the transformer blocks")
    serve.add_argument("--gpu-usd-per-hour", type=float, help="GPU price for the live cost figures (0: none)")
    serve.add_argument("--safety", choices=["none", "opennsfw", "hf-classifier"], help="post-filter (default none)")
    serve.add_argument("--safety-model", metavar="PATH", help="local folder for --safety hf-classifier")
    serve.add_argument("--safety-threshold", type=float, help="score at which an image is flagged")
    serve.add_argument("--log-level", default="info")
    return parser


def settings_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    flags: dict[str, Any] = {}
    for flag, field in _FLAG_TO_FIELD.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if flag == "max_batch_megapixels":
            value = round(value * 1_000_000)
        flags[field] = value
    return load_settings(flags, environ)


PIPELINE_CLASS = "Flux2KleinPipeline"
INSTALL_HINT = (
    "install the local extra: pip install 'klein-gateway[local]' (from a checkout: pip install -e '.[local]'); "
    "on a machine without a GPU, first pip install torch --index-url https://download.pytorch.org/whl/cpu for the CPU build"
)
DOWNLOAD_HINT = "fetch the weights on a machine with network, e.g. hf download black-forest-labs/FLUX.2-klein-4B --local-dir PATH, then --model PATH"


def startup_problem(settings: Settings) -> str | None:
    """Why this process cannot serve, as the user should read it; None if it can."""
    for module in ("torch", "diffusers"):
        try:
            imported = importlib.import_module(module)
        except ImportError as exc:
            return f"{module} cannot be imported ({exc}): {INSTALL_HINT}"
    if not hasattr(imported, PIPELINE_CLASS):
        return f"diffusers {getattr(imported, '__version__', '?')} has no {PIPELINE_CLASS} (0.38 or later has): {INSTALL_HINT}"
    if settings.model_path is None:
        return None
    path = settings.model_path
    if not path.is_dir():
        return f"--model {path}: no such folder; {DOWNLOAD_HINT}"
    index = path / "model_index.json"
    try:
        declared = json.loads(index.read_text()).get("_class_name")
    except FileNotFoundError:
        return f"--model {path}: no model_index.json, so not a diffusers pipeline folder; {DOWNLOAD_HINT}"
    except (OSError, ValueError, AttributeError) as exc:
        return f"--model {path}: model_index.json is unreadable ({type(exc).__name__}); {DOWNLOAD_HINT}"
    if declared != PIPELINE_CLASS:
        return f"--model {path}: holds a {declared or 'unnamed'} pipeline, not {PIPELINE_CLASS} (FLUX.2 [klein] 4B); {DOWNLOAD_HINT}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"  # real weights load from a local path only
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"klein-local: invalid settings: {exc}", file=sys.stderr)
        return 2
    problem = startup_problem(settings)
    if problem is not None:
        print(f"klein-local: cannot serve: {problem}", file=sys.stderr)
        return 2

    import uvicorn

    from local_backend.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level, workers=1)
    return 0
