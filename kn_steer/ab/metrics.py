"""Per-arm Prometheus metrics, registered in prometheus_client's default registry.

vLLM's ``/metrics`` serves that registry from the API-server process, so these series appear next
to vLLM's own. Names avoid the ``vllm:`` prefix (vLLM unregisters its own collectors by prefix).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram

LABELS = ("experiment", "arm")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


@dataclass(frozen=True)
class ABMetrics:
    requests: Counter
    errors: Counter
    prompt_tokens: Counter
    generation_tokens: Counter
    latency: Histogram

    def declare(self, experiment: str, arm: str) -> None:
        """Create the labelled series at 0 so every configured arm is visible before traffic."""
        for metric in (self.requests, self.errors, self.prompt_tokens, self.generation_tokens, self.latency):
            metric.labels(experiment, arm)

    def observe(self, record: dict[str, Any], experiment: str, arm: str) -> None:
        """Count one finished request of an arm."""
        self.requests.labels(experiment, arm).inc()
        if record.get("error"):
            self.errors.labels(experiment, arm).inc()
        prompt = record.get("prompt_tokens")
        if isinstance(prompt, (int, float)) and prompt > 0:
            self.prompt_tokens.labels(experiment, arm).inc(prompt)
        completion = record.get("completion_tokens")
        if isinstance(completion, (int, float)) and completion > 0:
            self.generation_tokens.labels(experiment, arm).inc(completion)
        latency = record.get("latency_s")
        if isinstance(latency, (int, float)) and latency >= 0:
            self.latency.labels(experiment, arm).observe(latency)


_lock = threading.Lock()
_metrics: ABMetrics | None = None


def _existing(name: str) -> Any:
    # A second import of this module (tests, reloads) must reuse the collectors already registered.
    return REGISTRY._names_to_collectors.get(name)  # noqa: SLF001 - no public lookup exists


def get_metrics() -> ABMetrics:
    """The process-wide metrics, created on first use."""
    global _metrics
    with _lock:
        if _metrics is None:
            def counter(name: str, doc: str) -> Counter:
                return _existing(name) or Counter(name, doc, LABELS)

            _metrics = ABMetrics(
                requests=counter("kn_steer_ab_requests", "Finished requests per experiment arm"),
                errors=counter("kn_steer_ab_errors", "Failed requests per experiment arm"),
                prompt_tokens=counter("kn_steer_ab_prompt_tokens", "Prompt tokens per experiment arm"),
                generation_tokens=counter("kn_steer_ab_generation_tokens", "Generated tokens per experiment arm"),
                latency=_existing("kn_steer_ab_request_latency_seconds") or Histogram(
                    "kn_steer_ab_request_latency_seconds", "End-to-end request latency per experiment arm",
                    LABELS, buckets=LATENCY_BUCKETS,
                ),
            )
        return _metrics
