"""The server's counters, rendered in Prometheus' text format (version 0.0.4) for `/metrics`.

Written by hand (a few counters and histograms) rather than with prometheus_client, so serving
needs no other dependency. Labels are bounded: routes are templates (`/v1/pipelines/{name}`),
never raw paths, so a client cannot grow the series without limit.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

#: request latency buckets, seconds
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: model batch size buckets (requests answered by one process(batch) call)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

Labels = tuple[tuple[str, str], ...]


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


def _labels(labels: Labels, extra: tuple[str, str] | None = None) -> str:
    items = [*labels, extra] if extra else list(labels)
    if not items:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Metrics:
    """Thread-safe counters of one server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[Labels, int] = defaultdict(int)
        self.latency: dict[Labels, Histogram] = {}
        self.errors: dict[Labels, int] = defaultdict(int)
        self.tokens: dict[Labels, int] = defaultdict(int)
        self.batches = Histogram(BATCH_BUCKETS)
        self.in_flight = 0
        #: answers stopped because their client went away, and the tokens they had generated
        self.cancelled = 0
        self.cancelled_tokens = 0

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def finished(self, route: str, method: str, status: int, seconds: float) -> None:
        labels = (("route", route), ("method", method), ("status", str(status)))
        with self._lock:
            self.in_flight -= 1
            self.requests[labels] += 1
            key = (("route", route),)
            hist = self.latency.get(key)
            if hist is None:
                hist = self.latency[key] = Histogram(LATENCY_BUCKETS)
            hist.observe(seconds)
            if status >= 400:
                kind = "client" if status < 500 else "server"
                self.errors[(("route", route), ("kind", kind))] += 1

    def add_tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.tokens[(("kind", "prompt"),)] += prompt
            self.tokens[(("kind", "completion"),)] += completion

    def cancel(self, completion: int) -> None:
        with self._lock:
            self.cancelled += 1
            self.cancelled_tokens += completion

    def batch(self, size: int) -> None:
        with self._lock:
            self.batches.observe(size)

    def render(self) -> str:
        out: list[str] = []
        with self._lock:
            out += [
                "# HELP sage_requests_total HTTP requests answered.",
                "# TYPE sage_requests_total counter",
            ]
            out += [
                f"sage_requests_total{_labels(k)} {v}" for k, v in sorted(self.requests.items())
            ]
            out += [
                "# HELP sage_request_duration_seconds Time from request to the end of the response.",
                "# TYPE sage_request_duration_seconds histogram",
            ]
            for key, hist in sorted(self.latency.items()):
                out += _histogram("sage_request_duration_seconds", key, hist)
            out += [
                "# HELP sage_errors_total Requests answered with a 4xx (client) or 5xx (server).",
                "# TYPE sage_errors_total counter",
            ]
            out += [f"sage_errors_total{_labels(k)} {v}" for k, v in sorted(self.errors.items())]
            out += [
                "# HELP sage_tokens_total Model tokens: prompt (read) and completion (generated).",
                "# TYPE sage_tokens_total counter",
            ]
            for kind in ("prompt", "completion"):
                key = (("kind", kind),)
                out.append(f"sage_tokens_total{_labels(key)} {self.tokens.get(key, 0)}")
            out += [
                "# HELP sage_cancelled_total Answers stopped because their client went away.",
                "# TYPE sage_cancelled_total counter",
                f"sage_cancelled_total {self.cancelled}",
                "# HELP sage_cancelled_tokens_total Tokens those answers had generated.",
                "# TYPE sage_cancelled_tokens_total counter",
                f"sage_cancelled_tokens_total {self.cancelled_tokens}",
            ]
            out += [
                "# HELP sage_batch_size Requests answered together by one model call.",
                "# TYPE sage_batch_size histogram",
            ]
            out += _histogram("sage_batch_size", (), self.batches)
            out += [
                "# HELP sage_requests_in_flight Requests being answered now.",
                "# TYPE sage_requests_in_flight gauge",
                f"sage_requests_in_flight {self.in_flight}",
            ]
        return "\n".join(out) + "\n"


def _histogram(name: str, labels: Labels, hist: Histogram) -> list[str]:
    lines = []
    cumulative = 0
    for bound, count in zip(hist.buckets, hist.counts, strict=False):
        cumulative += count
        lines.append(f"{name}_bucket{_labels(labels, ('le', _num(bound)))} {cumulative}")
    lines.append(f"{name}_bucket{_labels(labels, ('le', '+Inf'))} {hist.count}")
    lines.append(f"{name}_sum{_labels(labels)} {_num(round(hist.sum, 6))}")
    lines.append(f"{name}_count{_labels(labels)} {hist.count}")
    return lines
