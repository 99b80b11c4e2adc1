"""Prometheus metrics of one app, on its own registry (two apps in one process never collide).

Names follow Prometheus conventions: `_total` counters, `_seconds` histograms, base units.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Stage latencies on a CPU toy model sit in milliseconds, a real SD model on a GPU in tenths of
# seconds, a queue wait under load in seconds: one wide log-spaced set covers all three.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Every size up to 8, then powers of two up to `max_batch_size`."""
    sizes = set(range(1, min(max_batch_size, 8) + 1))
    power = 16
    while power < max_batch_size:
        sizes.add(power)
        power *= 2
    sizes.add(max_batch_size)
    return tuple(float(s) for s in sorted(sizes))


class Metrics:
    """The server's counters, gauges and histograms, and their text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "flashstep_http_requests_total", "HTTP requests by route template, method and status.",
            ["route", "method", "status"], registry=r,
        )
        self.queue_depth = Gauge("flashstep_queue_depth", "Images waiting for a batch.", registry=r)
        self.batch_size = Histogram(
            "flashstep_batch_size", "Images per engine forward pass.",
            buckets=batch_size_buckets(max_batch_size), registry=r,
        )
        self.stage_seconds = Histogram(
            "flashstep_stage_seconds",
            "Seconds per stage: queue (per image), encode/denoise/decode/total (per batch).",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.images = Counter("flashstep_images_generated_total", "Images generated, by model.", ["model"], registry=r)
        self.batch_failures = Counter(
            "flashstep_batch_failures_total", "Engine calls that raised, by model.", ["model"], registry=r
        )
        self.model_loads = Counter(
            "flashstep_model_loads_total", "Model loads, by result (ok, error, forbidden).", ["result"], registry=r
        )
        self.model_swaps = Counter(
            "flashstep_model_swaps_total", "Hot swaps, by result (ok, error, forbidden).", ["result"], registry=r
        )
        self.model_unloads = Counter("flashstep_model_unloads_total", "Models unloaded.", registry=r)
        self.worker_restarts = Counter(
            "flashstep_worker_restarts_total", "Device worker threads restarted after they died, by device.",
            ["device"], registry=r,
        )
        self.worker_process_restarts = Counter(
            "flashstep_worker_process_restarts_total", "Engine worker processes replaced after they died, by worker.",
            ["worker"], registry=r,
        )
        self.worker_processes = Gauge(
            "flashstep_worker_processes_serving", "Engine worker processes able to take a batch.", registry=r
        )
        self.non_finite_outputs = Counter(
            "flashstep_non_finite_outputs_total", "Images refused for NaN or Inf values, by model.", ["model"], registry=r
        )
        self.out_of_memory = Counter(
            "flashstep_out_of_memory_total", "Engine calls that ran out of device memory, by model.", ["model"],
            registry=r,
        )
        self.models_loaded = Gauge("flashstep_models_loaded", "Models currently serving.", registry=r)
        self.bodies_refused = Counter(
            "flashstep_request_bodies_refused_total",
            "Request bodies refused before parsing, by reason (too_large, timeout, not_utf8).",
            ["reason"], registry=r,
        )
        # The process's memory, CPU, open files, GC and Python version, as on the default registry
        # (process_resident_memory_bytes, ...); built anew because a collector joins one registry.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        r.register(CudaMemoryCollector())
        self._worker_memory = WorkerMemoryCollector()
        r.register(self._worker_memory)

    def watch_workers(self, pids: Callable[[], list[tuple[str, int]]]) -> None:
        """Report the resident memory of engine worker processes (`pids` gives (name, pid) pairs)."""
        self._worker_memory.pids = pids

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class WorkerMemoryCollector(Collector):
    """Resident memory of each engine worker process, read from /proc at scrape time.

    The process collector sees only the HTTP process; a leak in a worker shows here. One label,
    the worker's name (bounded by the worker count).
    """

    def __init__(self) -> None:
        self.pids: Callable[[], list[tuple[str, int]]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.pids is None:
            return
        family = GaugeMetricFamily(
            "flashstep_worker_resident_memory_bytes", "Resident memory of each engine worker process.", labels=["worker"]
        )
        page = os.sysconf("SC_PAGE_SIZE")
        for name, pid in self.pids():
            try:
                with open(f"/proc/{pid}/statm") as statm:
                    family.add_metric([name], float(int(statm.read().split()[1]) * page))
            except (OSError, ValueError, IndexError):
                continue  # exited between listing and reading, or no /proc
        yield family


class CudaMemoryCollector(Collector):
    """torch.cuda.memory_allocated/reserved per device, read at scrape time.

    Yields nothing until some engine has imported torch and initialised CUDA: a scrape never
    imports torch nor creates a CUDA context. One label, the device index (bounded by the host).
    """

    def collect(self) -> Iterator[GaugeMetricFamily]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return
        allocated = GaugeMetricFamily(
            "flashstep_cuda_memory_allocated_bytes", "Bytes held by tensors (torch.cuda.memory_allocated).", labels=["device"]
        )
        reserved = GaugeMetricFamily(
            "flashstep_cuda_memory_reserved_bytes", "Bytes held by the caching allocator (torch.cuda.memory_reserved).",
            labels=["device"],
        )
        for index in range(torch.cuda.device_count()):
            allocated.add_metric([str(index)], float(torch.cuda.memory_allocated(index)))
            reserved.add_metric([str(index)], float(torch.cuda.memory_reserved(index)))
        yield allocated
        yield reserved
