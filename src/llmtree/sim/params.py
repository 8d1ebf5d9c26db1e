"""SimConfig: every knob of one simulated run, each with a default and a line of doc."""

from __future__ import annotations

from dataclasses import dataclass

from llmtree.errors import ConfigError

POLICIES = ("seed", "p2c", "p2c+sent", "least-loaded", "weighted-rr")
OUTPUT_DISTRIBUTIONS = ("fixed", "uniform", "exponential")
SERVICE_MODELS = ("measured", "constant")


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One run. Times in seconds unless the name says otherwise."""

    nodes: int = 100
    """Serving nodes (workers); the root is extra and only forwards, as in the real tree."""
    fanout: int = 4
    """Children per node; the tree is filled breadth first, like ``llmtree up``."""
    slots: int = 32
    """Requests a node serves at once (its continuous batch), ``LLMTREE_SLOTS``."""
    max_queue: int = 64
    """Requests a node holds waiting beyond its slots, ``LLMTREE_MAX_QUEUE``."""
    policy: str = "seed"
    """``seed`` (the real rule) or an alternative: ``p2c``, ``p2c+sent``, ``least-loaded``,
    ``weighted-rr`` (placement.py)."""
    load: float = 0.8
    """Offered load as a multiple of the tree's capacity; ignored when ``rate`` is set."""
    rate: float | None = None
    """Poisson arrival rate in requests/s; overrides ``load``."""
    output_tokens: float = 128.0
    """Mean output length in tokens."""
    output_dist: str = "fixed"
    """``fixed``, ``uniform`` (1 .. 2*mean-1) or ``exponential`` (at least 1 token)."""
    service: str = "measured"
    """``measured``: a batch of k runs at the measured aggregate rate R(k), shared by its k
    requests; ``constant``: every request runs at R(1) whatever the batch (no batching cost)."""
    curve: tuple[tuple[int, float], ...] | None = None
    """(concurrency, output tokens/s) points to use instead of calibration.json."""
    hop_ms: float = 0.8
    """Latency of one ``submit`` call between nodes (measured: ~0.8 ms per tree level)."""
    heartbeat_s: float = 2.0
    """How stale the load reports that p2c / least-loaded read are (0: always fresh)."""
    duration_s: float = 40.0
    """Arrivals run from 0 to this time; the tree then drains."""
    warmup_s: float = 15.0
    """Requests that arrive before this are served but not measured."""
    seed: int = 0
    """Seed of arrivals, output lengths and the random choices of p2c."""

    def validate(self) -> SimConfig:
        """Raise ``ConfigError`` saying what to change; returns self."""
        if self.nodes < 1:
            raise ConfigError("--nodes must be at least 1")
        if self.fanout < 1:
            raise ConfigError("--fanout must be at least 1")
        if self.slots < 1 or self.max_queue < 0:
            raise ConfigError("--slots must be at least 1 and --max-queue at least 0")
        if self.policy not in POLICIES:
            raise ConfigError(f"--policy must be one of {', '.join(POLICIES)}")
        if self.output_dist not in OUTPUT_DISTRIBUTIONS:
            raise ConfigError(f"--output-dist must be one of {', '.join(OUTPUT_DISTRIBUTIONS)}")
        if self.service not in SERVICE_MODELS:
            raise ConfigError(f"--service must be one of {', '.join(SERVICE_MODELS)}")
        if self.rate is None and not self.load > 0:
            raise ConfigError("--load must be above 0")
        if self.rate is not None and not self.rate > 0:
            raise ConfigError("--rate must be above 0")
        if not self.output_tokens >= 1:
            raise ConfigError("--output-tokens must be at least 1")
        if self.hop_ms < 0 or self.heartbeat_s < 0:
            raise ConfigError("--hop-ms and --heartbeat must be 0 or more")
        if not 0 <= self.warmup_s < self.duration_s:
            raise ConfigError("--warmup must be 0 or more and below --duration")
        return self
