"""The server's Prometheus metrics (prometheus-client), in a registry of their own per server."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

_LATENCY = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class Metrics:
  """Queue depth, active slots, generated tokens, requests by status, TTFT, per-token latency."""

  def __init__(self):
    self.registry = CollectorRegistry()
    r = self.registry
    self.queue_depth = Gauge("realign_queue_depth", "requests waiting for slots", registry=r)
    self.active_slots = Gauge("realign_active_slots", "slots decoding a row", registry=r)
    self.tokens = Counter("realign_generated_tokens", "tokens generated", registry=r)
    self.requests = Counter("realign_requests", "requests answered, by HTTP status",
                            ["status"], registry=r)
    self.ttft = Histogram("realign_time_to_first_token_seconds",
                          "from a request's arrival to its first token", buckets=_LATENCY,
                          registry=r)
    self.step_seconds = Histogram("realign_time_per_output_token_seconds",
                                  "one decoding step of every slot (a token per live row)",
                                  buckets=_LATENCY, registry=r)

  def exposition(self) -> tuple:
    """(body bytes, content type) of GET /metrics."""
    return generate_latest(self.registry), CONTENT_TYPE_LATEST
