"""Counters the server keeps, written out in Prometheus' text format at GET /metrics.

The worker thread and the HTTP side both update them; each update is a single attribute write or an
addition under a lock, so a scrape sees consistent numbers without slowing the decode loop.
"""

from __future__ import annotations

import collections
import threading


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status code) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.reused_prompt_tokens = 0  # prompt tokens taken from a kept prefix instead of computed
        self.queue_length = 0
        self.active_rows = 0
        self.decode_steps = 0
        self.decode_seconds = 0.0
        self.decode_row_tokens = 0  # tokens produced by decode steps (one per row per step)
        self.refusals = 0  # requests a guard refused
        self.compactions = 0  # times the batch was prefilled again to drop its padding
        self.disconnects = 0  # requests whose client went away before the answer was complete
        self.cancelled_rows = 0  # rows the batcher dropped because their client went away

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def record_step(self, rows: int, seconds: float) -> None:
        with self._lock:
            self.decode_steps += 1
            self.decode_seconds += seconds
            self.decode_row_tokens += rows

    def render(self) -> str:
        """The Prometheus exposition text (version 0.0.4)."""
        with self._lock:
            lines = ["# HELP llama_ref_requests_total HTTP requests answered, by endpoint and status code.",
                     "# TYPE llama_ref_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'llama_ref_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            per_token = self.decode_seconds / self.decode_row_tokens if self.decode_row_tokens else 0.0
            for name, kind, value, text in [
                ("prompt_tokens_total", "counter", self.prompt_tokens, "Prompt tokens received."),
                ("prompt_tokens_reused_total", "counter", self.reused_prompt_tokens,
                 "Prompt tokens served from a cached prefix instead of computed."),
                ("completion_tokens_total", "counter", self.completion_tokens, "Tokens generated."),
                ("queue_length", "gauge", self.queue_length, "Requests waiting to join the batch."),
                ("batch_rows", "gauge", self.active_rows, "Rows decoding in the batch now."),
                ("decode_steps_total", "counter", self.decode_steps, "Batched decode steps run."),
                ("decode_seconds_total", "counter", self.decode_seconds, "Time spent in decode steps."),
                ("time_per_output_token_seconds", "gauge", per_token,
                 "Mean decode time per generated token (step time divided by the rows in the step)."),
                ("batch_compactions_total", "counter", self.compactions,
                 "Times the batch was prefilled again to drop the padding that rows leaving left behind."),
                ("guard_refusals_total", "counter", self.refusals, "Requests refused by the guard."),
                ("client_disconnects_total", "counter", self.disconnects,
                 "Requests whose client left before the answer was complete."),
                ("cancelled_rows_total", "counter", self.cancelled_rows,
                 "Rows dropped from the batch (or the queue) because their client left."),
            ]:
                lines += [f"# HELP llama_ref_{name} {text}", f"# TYPE llama_ref_{name} {kind}",
                          f"llama_ref_{name} {value}"]
            return "\n".join(lines) + "\n"
