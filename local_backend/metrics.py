"""Prometheus metrics of the local backend, on a registry the app owns.

A registry per app (not prometheus_client's global one) keeps several apps in
one process, as in tests, from colliding (docs/local-backend.md#http-and-metrics). Names
are the ones docs/local-backend.md#http-and-metrics lists (the local emulator serves the
same); labels stay low-cardinality (`bucket` is a configured bucket size or
"other", never a free-form size).

    local_backend_ready                         1 once warm-up finished
    local_backend_queue_depth{unit}             queued "requests" and "megapixels"
    local_backend_estimated_wait_seconds        what a new request would wait
    local_backend_queue_wait_seconds            histogram, enqueue to batch start
    local_backend_inference_seconds{bucket}     histogram, per pipeline call
    local_backend_batch_images                  histogram, images per pipeline call
    local_backend_forwards_total                pipeline calls
    local_backend_images_total{bucket}          images generated for callers
    local_backend_rejected_total{reason}        queue_full, not_ready, deadline, invalid, out_of_memory, error
    local_backend_oom_total                     out-of-memory errors (each split a batch)
    local_backend_nsfw_flagged_total            images blanked by the safety checker
    local_backend_previews_total                partial images sent to streaming requests
    local_backend_gpu_busy_seconds_total        time the pipeline ran for callers
    local_backend_gpu_memory_peak_bytes         torch.cuda.max_memory_allocated (cuda only)
    local_backend_cost_per_image_usd{kind}      "marginal" | "amortised", for 1024x1024 at 4 steps
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from local_backend.schemas import CostFigures

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "local_backend_"

_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)


class BackendMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ready = Gauge(PREFIX + "ready", "1 once warm-up finished", registry=r)
        self.queue_depth = Gauge(PREFIX + "queue_depth", "Queued work", ["unit"], registry=r)
        self.estimated_wait = Gauge(PREFIX + "estimated_wait_seconds", "Estimated wait for a new request", registry=r)
        self.queue_wait = Histogram(PREFIX + "queue_wait_seconds", "Enqueue to batch start", buckets=_SECONDS_BUCKETS, registry=r)
        self.inference = Histogram(PREFIX + "inference_seconds", "Seconds per pipeline call", ["bucket"], buckets=_SECONDS_BUCKETS, registry=r)
        self.batch_images = Histogram(PREFIX + "batch_images", "Images per pipeline call", buckets=_BATCH_BUCKETS, registry=r)
        self.forwards = Counter(PREFIX + "forwards", "Pipeline calls", registry=r)
        self.images = Counter(PREFIX + "images", "Images generated for callers", ["bucket"], registry=r)
        self.rejected = Counter(PREFIX + "rejected", "Requests refused or dropped", ["reason"], registry=r)
        self.oom = Counter(PREFIX + "oom", "Out-of-memory errors", registry=r)
        self.nsfw_flagged = Counter(PREFIX + "nsfw_flagged", "Images blanked by the safety checker", registry=r)
        self.previews = Counter(PREFIX + "previews", "Partial images sent to streaming requests", registry=r)
        self.gpu_busy = Counter(PREFIX + "gpu_busy_seconds", "Pipeline busy time for callers", registry=r)
        self.gpu_memory_peak = Gauge(PREFIX + "gpu_memory_peak_bytes", "Peak device memory allocated", registry=r)
        self.cost_per_image = Gauge(PREFIX + "cost_per_image_usd", "Live cost per 1024x1024 4-step image", ["kind"], registry=r)

    def set_queue(self, requests: int, megapixels: float) -> None:
        self.queue_depth.labels(unit="requests").set(requests)
        self.queue_depth.labels(unit="megapixels").set(megapixels)

    def set_cost(self, cost: CostFigures) -> None:
        for kind, value in (("marginal", cost.marginal_usd_per_image), ("amortised", cost.amortized_usd_per_image)):
            self.cost_per_image.labels(kind=kind).set(float("nan") if value is None else value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
