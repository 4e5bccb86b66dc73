"""Server metrics in Prometheus' text exposition format (version 0.0.4).

Counters and histograms are kept here; gauges of the engine's state (running and waiting
sequences, cache use) are read at scrape time. Everything is touched from the event loop only.
"""

from __future__ import annotations

import bisect
from collections import Counter

# seconds; time to first token spans queueing and prefill, inter-token latency one decode step
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.sum += value * times

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            total += count
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            lines.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        lines += [f"{self.name}_sum {self.sum}", f"{self.name}_count {total}"]
        return lines


class Metrics:
    def __init__(self):
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.aborted = 0
        self.refused: Counter[str] = Counter()  # requests refused before parsing, by reason (limits.py)
        self.ttft = Histogram("dsv2_time_to_first_token_seconds", "Time from request to its first token.",
                              _TTFT_BUCKETS)
        self.itl = Histogram("dsv2_inter_token_latency_seconds", "Time between a request's successive tokens.",
                             _ITL_BUCKETS)
        self.e2e = Histogram("dsv2_request_latency_seconds", "Time from request to its last token.", _E2E_BUCKETS)

    def render(self, in_flight: int, engine: dict, guard) -> str:
        lines = ["# HELP dsv2_requests_total Requests answered, by endpoint and HTTP status.",
                 "# TYPE dsv2_requests_total counter"]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'dsv2_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        refused = {**self.refused, "connections": guard.refused, "header_timeout": guard.timed_out}
        lines += ["# HELP dsv2_refused_total Requests and connections refused by the limits, by reason.",
                  "# TYPE dsv2_refused_total counter"]
        for reason in ("too_large", "body_timeout", "disconnected", "connections", "header_timeout"):
            lines.append(f'dsv2_refused_total{{reason="{reason}"}} {refused.get(reason, 0)}')
        scalars = [
            ("dsv2_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", self.prompt_tokens),
            ("dsv2_generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens),
            ("dsv2_requests_aborted_total", "counter", "Requests aborted (client gone).", self.aborted),
            ("dsv2_requests_in_flight", "gauge", "Requests admitted and not yet answered.", in_flight),
            ("dsv2_connections_open", "gauge", "HTTP connections open.", len(guard.open)),
            ("dsv2_engine_step_errors_total", "counter", "Engine steps that failed (their requests with them).",
             engine["step_errors"]),
            ("dsv2_num_requests_running", "gauge", "Sequences in the running batch.", engine["running"]),
            ("dsv2_num_requests_waiting", "gauge", "Sequences queued for the engine.", engine["waiting"]),
            ("dsv2_kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use.", engine["cache_usage"]),
            ("dsv2_kv_cache_free_blocks", "gauge", "KV-cache blocks on the free list.", engine["free_blocks"]),
            ("dsv2_kv_cache_blocks", "gauge", "KV-cache blocks in all.", engine["num_blocks"]),
            ("dsv2_num_preemptions_total", "counter", "Sequences preempted for cache space.",
             engine["num_preemptions"]),
        ]
        for name, kind, help, value in scalars:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"]
        for h in (self.ttft, self.itl, self.e2e):
            lines += h.render()
        return "\n".join(lines) + "\n"
