"""The server's counters and histograms, in the Prometheus text exposition format (version 0.0.4).

Hand-written: prometheus_client is not a dependency and the format is a few lines.
"""

from __future__ import annotations

import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Counters and histograms in the Prometheus text exposition format (version 0.0.4)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = {}
        self.batches = [0] * (len(BATCH_BUCKETS) + 1)
        self.batch_sum = 0
        self.texts = 0
        self.abstentions = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            counts = self.latency.setdefault(endpoint, [0] * (len(LATENCY_BUCKETS) + 1))
            counts[_bucket(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum[endpoint] = self.latency_sum.get(endpoint, 0.0) + seconds

    def abstained(self, n: int) -> None:
        with self.lock:
            self.abstentions += n

    def batch(self, size: int) -> None:
        with self.lock:
            self.batches[_bucket(BATCH_BUCKETS, size)] += 1
            self.batch_sum += size
            self.texts += size

    def render(self, queued: int, loaded: bool) -> str:
        with self.lock:
            out = ["# HELP qwen_ft_requests_total HTTP requests by endpoint and status code.",
                   "# TYPE qwen_ft_requests_total counter"]
            out += [f'qwen_ft_requests_total{{endpoint="{e}",code="{c}"}} {n}'
                    for (e, c), n in sorted(self.requests.items())]
            out += ["# HELP qwen_ft_request_errors_total HTTP requests answered with a status >= 400.",
                    "# TYPE qwen_ft_request_errors_total counter"]
            errors: dict[str, int] = {}
            for (e, c), n in self.requests.items():
                if c >= 400:
                    errors[e] = errors.get(e, 0) + n
            out += [f'qwen_ft_request_errors_total{{endpoint="{e}"}} {n}' for e, n in sorted(errors.items())]
            out += ["# HELP qwen_ft_request_latency_seconds Time from request to response.",
                    "# TYPE qwen_ft_request_latency_seconds histogram"]
            for e, counts in sorted(self.latency.items()):
                out += _histogram("qwen_ft_request_latency_seconds", f'endpoint="{e}",', LATENCY_BUCKETS, counts,
                                  self.latency_sum[e])
            out += ["# HELP qwen_ft_batch_size Texts per forward batch.", "# TYPE qwen_ft_batch_size histogram"]
            out += _histogram("qwen_ft_batch_size", "", BATCH_BUCKETS, self.batches, self.batch_sum)
            out += ["# HELP qwen_ft_texts_total Texts classified.", "# TYPE qwen_ft_texts_total counter",
                    f"qwen_ft_texts_total {self.texts}",
                    "# HELP qwen_ft_abstentions_total Texts answered with the fallback label (confidence below the "
                    "threshold).", "# TYPE qwen_ft_abstentions_total counter",
                    f"qwen_ft_abstentions_total {self.abstentions}",
                    "# HELP qwen_ft_queue_texts Texts waiting or being computed.", "# TYPE qwen_ft_queue_texts gauge",
                    f"qwen_ft_queue_texts {queued}",
                    "# HELP qwen_ft_model_loaded 1 once the model is loaded.", "# TYPE qwen_ft_model_loaded gauge",
                    f"qwen_ft_model_loaded {int(loaded)}"]
        return "\n".join(out) + "\n"


def _bucket(bounds: tuple, value: float) -> int:
    return next((i for i, b in enumerate(bounds) if value <= b), len(bounds))


def _histogram(name: str, labels: str, bounds: tuple, counts: list[int], total: float) -> list[str]:
    out, cumulative = [], 0
    for bound, n in zip((*bounds, "+Inf"), counts):
        cumulative += n
        out.append(f'{name}_bucket{{{labels}le="{bound}"}} {cumulative}')
    plain = labels.rstrip(",")
    out += [f"{name}_sum{{{plain}}} {total}" if plain else f"{name}_sum {total}",
            f"{name}_count{{{plain}}} {cumulative}" if plain else f"{name}_count {cumulative}"]
    return out
