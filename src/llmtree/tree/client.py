"""Calling other nodes over Pyro5: per-thread proxies, timeouts, one error type.

Pyro5 proxies belong to the thread that made them, so ``Peers`` keeps one proxy per (thread,
URI). Every call has a timeout; any Pyro5 communication failure becomes ``NodeUnavailable``, and
llmtree errors raised by the peer (``Overloaded``, ``InvalidRequest``...) pass through unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import Pyro5
import Pyro5.api
import Pyro5.errors
import Pyro5.serializers
import Pyro5.socketutil

from llmtree.errors import ConfigError, LlmTreeError, NodeUnavailable, register_remote_errors

if TYPE_CHECKING:
    from llmtree.config import Settings

logger = logging.getLogger(__name__)

OBJECT_ID = "llmtree.node"
SINK_ID = "llmtree.sink"

register_remote_errors()


SERIALIZER: Final = "serpent"


class RefusedSerializer(Pyro5.serializers.SerializerBase):  # type: ignore[misc]
    """Stands in for every serializer but serpent: answers, but never decodes a byte.

    Pyro5's daemon decodes a message with whatever serializer its header names (the client
    picks). Replacing the others in ``serializers_by_id`` makes a marshal/json/msgpack client get
    a clear refusal, and a message naming an unknown id (pickle, dill) is dropped unread.
    """

    def __init__(self, original: Any) -> None:
        self.serializer_id = original.serializer_id
        self._original = original
        self.name = type(original).__name__

    def _refuse(self, *_: Any) -> Any:
        raise Pyro5.errors.SecurityError(
            f"serializer {self.name} refused: llmtree only accepts {SERIALIZER}"
        )

    loads = loadsCall = _refuse

    def dumps(self, data: Any) -> Any:  # the refusal itself goes back in the client's format
        return self._original.dumps(data)

    def dumpsCall(self, obj: Any, method: str, vargs: Any, kwargs: Any) -> Any:
        return self._refuse()


def restrict_serializers() -> None:
    """Make serpent the only serializer this process decodes, as server and as client."""
    by_id = Pyro5.serializers.serializers_by_id
    for serializer_id, serializer in list(by_id.items()):
        if serializer.serializer_id != Pyro5.serializers.SerpentSerializer.serializer_id and not (
            isinstance(serializer, RefusedSerializer)
        ):
            by_id[serializer_id] = RefusedSerializer(serializer)


def configure_pyro(threadpool_size: int) -> None:
    """Process-wide Pyro5 settings: serpent only, a thread server, bounded messages."""
    Pyro5.config.SERIALIZER = SERIALIZER
    Pyro5.config.SERVERTYPE = "thread"
    Pyro5.config.THREADPOOL_SIZE = threadpool_size
    Pyro5.config.THREADPOOL_SIZE_MIN = min(8, threadpool_size)
    Pyro5.config.MAX_MESSAGE_SIZE = 16 * 1024 * 1024
    Pyro5.config.DETAILED_TRACEBACK = False
    restrict_serializers()
    assert Pyro5.config.SERIALIZER == SERIALIZER


class _ServerContext(ssl.SSLContext):
    """Server side: the TLS handshake runs in the connection's worker thread, not in accept().

    Pyro5 wraps its listening socket, so by default every handshake happens inside the one
    thread that accepts connections; a peer that connects and says nothing would stall it.
    """

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def _tls_contexts(cert: Path, key: Path, ca: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts: TLS 1.2+, our CA only, a certificate required both ways."""
    server = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks the hostname in the URI
    for context in (server, client):
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(str(cert), str(key))
        context.load_verify_locations(cafile=str(ca))  # the project CA and nothing else
    return server, client


def configure_tls(settings: Settings) -> bool:
    """With ``settings.tls``: every Pyro5 daemon and proxy of this process uses mutual TLS.

    Set before the first daemon or proxy (Pyro5 keeps one context per process). Returns whether
    TLS is on; raises ConfigError naming a missing file and the command that makes it.
    """
    if not settings.tls:
        return False
    cert, key, ca = settings.tls_files()
    for path in (ca, cert, key):
        if not path.is_file():
            raise ConfigError(
                f"TLS is on but {path} does not exist; run `llmtree certs init` and "
                "`llmtree certs issue node` (or set LLMTREE_TLS_CERT/_KEY/_CA)"
            )
    try:
        server, client = _tls_contexts(cert, key, ca)
    except (ssl.SSLError, OSError) as error:
        raise ConfigError(f"cannot load the TLS certificate {cert} / key {key}: {error}") from None
    Pyro5.config.SSL = True
    Pyro5.config.SSL_REQUIRECLIENTCERT = True
    Pyro5.config.SSL_SERVERCERT, Pyro5.config.SSL_SERVERKEY = str(cert), str(key)
    Pyro5.config.SSL_CLIENTCERT, Pyro5.config.SSL_CLIENTKEY = str(cert), str(key)
    Pyro5.config.SSL_CACERTS = str(ca)
    # Pyro5 caches one server and one client context per process; ours replace its defaults
    # (which would also trust the system's public CAs when acting as a client).
    setattr(Pyro5.socketutil, "__ssl_server_context", server)  # noqa: B010
    setattr(Pyro5.socketutil, "__ssl_client_context", client)  # noqa: B010
    restrict_serializers()
    return True


def node_uri(host: str, port: int, object_id: str = OBJECT_ID) -> str:
    return f"PYRO:{object_id}@{host}:{port}"


class Peers:
    """Thread-safe access to remote objects by URI; safe to share between threads."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._local = threading.local()

    def _proxy(self, uri: str) -> Any:
        cache: dict[str, Any] | None = getattr(self._local, "proxies", None)
        if cache is None:
            cache = self._local.proxies = {}
        proxy = cache.get(uri)
        if proxy is None:
            try:
                proxy = Pyro5.api.Proxy(uri)
            except Pyro5.errors.PyroError as error:
                raise NodeUnavailable(f"bad node URI {uri!r}: {error}") from error
            proxy._pyroTimeout = self.timeout_s
            cache[uri] = proxy
        return proxy

    def forget(self, uri: str) -> None:
        """Drop this thread's proxy to ``uri`` (after a failure, so the next call reconnects)."""
        cache: dict[str, Any] | None = getattr(self._local, "proxies", None)
        if cache and (proxy := cache.pop(uri, None)) is not None:
            with contextlib.suppress(Exception):  # releasing a broken proxy must not fail
                proxy._pyroRelease()

    def call(self, uri: str, method: str, *args: Any) -> Any:
        """Call ``method`` on the object at ``uri``; raises NodeUnavailable or the peer's error."""
        proxy = self._proxy(uri)
        try:
            return getattr(proxy, method)(*args)
        except LlmTreeError:
            raise
        except Pyro5.errors.CommunicationError as error:
            self.forget(uri)
            raise NodeUnavailable(f"node at {uri} is unavailable: {error}") from error
        except Pyro5.errors.PyroError as error:
            self.forget(uri)
            raise NodeUnavailable(f"call {method} to {uri} failed: {error}") from error

    def close(self) -> None:
        """Release this thread's proxies."""
        for uri in list(getattr(self._local, "proxies", {}) or {}):
            self.forget(uri)
