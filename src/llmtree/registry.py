"""The node directory: one LDAP entry per live node, ``cn=<name>,ou=Nodes,<base>``.

Nodes call ``register`` once, ``heartbeat`` every ``settings.heartbeat_s`` and ``unregister`` on
the way out; the gateway and the CLI read with ``lookup``, ``children`` and ``list_nodes``.
Entries are RFC 2589 dynamic objects (the dds overlay): one not refreshed within
``settings.node_ttl_s`` disappears by itself, so a killed node leaves nothing behind.

``connect`` opens ldap3 SAFE_RESTARTABLE connections once (thread-safe; they reconnect after a
short outage): an anonymous reader and, for nodes, a writer bound as the service account.
Every ldap3 error becomes a ``RegistryError`` (or ``NameTaken``, ``UnknownNode``) here.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import ldap3
from ldap3.core.exceptions import LDAPMaximumRetriesError
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn
from pyasn1.codec.ber import encoder
from pyasn1.type import namedtype, tag, univ

from llmtree.config import Settings
from llmtree.errors import InvalidRequest, LlmTreeError, NameTaken, RegistryError, UnknownNode

logger = logging.getLogger(__name__)

NODE_ATTRIBUTES = ["cn", "llmNodeURI", "llmNodeHost", "llmParentName", "llmCapacity", "llmLoad"]
NODE_ATTRIBUTES += ["llmStatus", "llmHeartbeat", "llmModel", "entryTtl"]
REFRESH_OID = "1.3.6.1.4.1.1466.101.119.1"  # RFC 2589 refresh of a dynamic entry's TTL
PAGED_RESULTS_OID = "1.2.840.113556.1.4.319"
SUCCESS, NO_SUCH_OBJECT, ALREADY_EXISTS = 0, 32, 68
PAGE_SIZE = 500


def _context_tag(number: int) -> tag.Tag:
    return tag.Tag(tag.tagClassContext, tag.tagFormatSimple, number)


class _RefreshRequest(univ.Sequence):  # type: ignore[misc]
    """RFC 2589: SEQUENCE { entryName [0] LDAPDN, requestTtl [1] INTEGER }."""

    componentType = namedtype.NamedTypes(
        namedtype.NamedType("entryName", univ.OctetString().subtype(implicitTag=_context_tag(0))),
        namedtype.NamedType("requestTtl", univ.Integer().subtype(implicitTag=_context_tag(1))),
    )


def _generalized_time(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%d%H%M%SZ")


def _one(value: Any) -> Any:
    """The first value of an attribute: ldap3 gives a list when absent or multi-valued."""
    if isinstance(value, list | tuple):
        return value[0] if value else None
    return value


def _as_int(value: Any) -> int | None:
    value = _one(value)
    return None if value is None or value == "" else int(value)


def _as_time(value: Any) -> datetime | None:
    value = _one(value)
    if value is None or isinstance(value, datetime):
        return value
    return datetime.strptime(str(value)[:14], "%Y%m%d%H%M%S").replace(tzinfo=UTC)


def _reason(exc: BaseException) -> str:
    """A one-line cause; for ldap3's give-up-after-retries, the last error it met."""
    if isinstance(exc, LDAPMaximumRetriesError) and len(exc.args) > 1 and exc.args[1]:
        exc = exc.args[1][-1]
    return f"{type(exc).__name__}: {exc}"


@dataclass(slots=True)
class NodeRecord:
    """What the directory knows about one node. ``ttl`` is read-only (the entry's entryTtl)."""

    name: str
    uri: str
    host: str = ""
    parent: str | None = None
    capacity: int = 0
    load: int = 0
    status: str = "idle"
    heartbeat: datetime | None = None
    model: str = ""
    ttl: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (heartbeat as an ISO 8601 string), e.g. for ``GET /api/nodes``."""
        data = asdict(self)
        data["heartbeat"] = self.heartbeat.isoformat() if self.heartbeat is not None else None
        return data

    def to_ldap(self) -> dict[str, Any]:
        """The attributes of a new entry (empty optional values left out); heartbeat: now."""
        attributes = {"cn": self.name, "llmNodeURI": self.uri, "llmNodeHost": self.host}
        attributes.update(llmParentName=self.parent or "", llmStatus=self.status)
        attributes.update(llmModel=self.model, llmHeartbeat=_generalized_time(self.heartbeat))
        present: dict[str, Any] = {key: value for key, value in attributes.items() if value}
        return present | {"llmCapacity": self.capacity, "llmLoad": self.load}

    @classmethod
    def from_ldap(cls, attributes: Mapping[str, Any]) -> NodeRecord:
        """A record from a search result's attributes (typed by ldap3, which read the schema)."""

        def text(key: str) -> str:
            value = _one(attributes.get(key))
            return "" if value is None else str(value)

        return cls(
            name=text("cn"),
            uri=text("llmNodeURI"),
            host=text("llmNodeHost"),
            parent=text("llmParentName") or None,
            capacity=_as_int(attributes.get("llmCapacity")) or 0,
            load=_as_int(attributes.get("llmLoad")) or 0,
            status=text("llmStatus") or "idle",
            heartbeat=_as_time(attributes.get("llmHeartbeat")),
            model=text("llmModel"),
            ttl=_as_int(attributes.get("entryTtl")),
        )


class Registry:
    """Reads and writes the node directory; thread-safe, one instance per process.

    Construction does no I/O: call ``connect`` first (``writer=False`` for read-only users such
    as the gateway) and ``close`` at the end. Every method raises RegistryError when LDAP fails.
    """

    def __init__(self, settings: Settings, *, password: str | None = None) -> None:
        self.settings = settings
        self.url = settings.ldap_url
        self._password = password
        self._reader: ldap3.Connection | None = None
        self._writer: ldap3.Connection | None = None

    def connect(self, writer: bool = True) -> None:
        """Open the anonymous reader and, if ``writer``, bind the service account.

        Raises RegistryError when the server is unreachable or the password missing or wrong.
        """
        self.close()
        timeout = self.settings.ldap_timeout_s
        # IP_SYSTEM_DEFAULT: the other modes shun an address for 5 s after one failed connect.
        server = ldap3.Server(
            self.url, connect_timeout=timeout, get_info=ldap3.SCHEMA, mode=ldap3.IP_SYSTEM_DEFAULT
        )
        self._reader = self._bind(server, None, None)
        if not writer:
            return
        dn = self.settings.service_dn
        password = self.settings.service_password() if self._password is None else self._password
        try:
            if not password:
                raise RegistryError(
                    f"no password for {dn}: set LLMTREE_LDAP_PASSWORD, or run llmtree ldap init"
                    f" (it writes {self.settings.ldap_data_dir / 'nodes.secret'})"
                )
            self._writer = self._bind(server, dn, password)
        except RegistryError:
            self.close()
            raise

    def _bind(
        self, server: ldap3.Server, user: str | None, password: str | None
    ) -> ldap3.Connection:
        timeout = self.settings.ldap_timeout_s
        conn = ldap3.Connection(
            server,
            user=user,
            password=password,
            client_strategy=ldap3.SAFE_RESTARTABLE,
            raise_exceptions=False,  # results are checked here; raising makes ldap3 resend
            receive_timeout=max(1, math.ceil(timeout)),  # ldap3 packs it as whole seconds
        )
        conn.strategy.restartable_tries = 2  # ride out a slapd restart, give up in ~ the timeout
        conn.strategy.restartable_sleep_time = min(0.5, timeout / 4)
        try:
            conn.open()
            bound, result, _, _ = conn.bind()
        except Exception as exc:  # a non-LDAP peer raises KeyError from the BER decoder
            raise RegistryError(
                f"cannot reach the LDAP directory at {self.url} ({_reason(exc)});"
                " is slapd running? try: llmtree ldap start"
            ) from exc
        if not bound:
            conn.unbind()
            raise RegistryError(
                f"LDAP bind as {user} at {self.url} failed: {result['description']};"
                " check LLMTREE_LDAP_PASSWORD (default: the nodes.secret of llmtree ldap init)"
            )
        return conn

    def close(self) -> None:
        """Unbind both connections; idempotent, never raises."""
        for conn in (self._reader, self._writer):
            if conn is not None:
                with contextlib.suppress(Exception):  # closing a broken connection is fine
                    conn.unbind()
        self._reader = self._writer = None

    # -- writes (nodes, with the service account) -------------------------------------------
    def register(self, record: NodeRecord, is_alive: Callable[[str], bool] | None = None) -> None:
        """Add the node's entry and set its TTL to ``settings.node_ttl_s``.

        A name already taken is replaced when ``is_alive(existing_uri)`` is False or the URI is
        the record's own; otherwise NameTaken.
        """
        dn = self._dn(record.name)
        for _ in range(3):  # the old entry may expire between our add and our look at it
            classes = ["llmNode", "dynamicObject"]
            result, _ = self._call(
                "add", record.name, dn, classes, record.to_ldap(), tolerate=(ALREADY_EXISTS,)
            )
            if result["result"] == SUCCESS:
                break
            try:
                existing = self.lookup(record.name)
            except UnknownNode:
                continue
            if existing.uri != record.uri and (is_alive is None or is_alive(existing.uri)):
                raise NameTaken(
                    f"node name {record.name!r} is already registered and alive at"
                    f" {existing.uri}; pick another --name or stop that node"
                )
            logger.info("node %r: taking the name over from %s", record.name, existing.uri)
            self._call("delete", record.name, dn, tolerate=(NO_SUCH_OBJECT,))
        else:
            raise RegistryError(f"could not register {record.name!r}: its entry keeps changing")
        self._refresh(record.name, dn)
        logger.info("node %r registered at %s", record.name, record.uri)

    def heartbeat(self, name: str, load: int, status: str, capacity: int | None = None) -> None:
        """Update load, status, heartbeat time (and capacity), then refresh the TTL.

        Raises UnknownNode if the entry is gone (it expired): the caller registers again.
        """
        values: dict[str, Any] = {"llmLoad": load, "llmStatus": status}
        values.update(llmHeartbeat=_generalized_time())
        if capacity is not None:
            values["llmCapacity"] = capacity
        changes = {key: [(ldap3.MODIFY_REPLACE, [value])] for key, value in values.items()}
        dn = self._dn(name)
        self._call("modify", name, dn, changes)
        self._refresh(name, dn)

    def set_parent(self, name: str, parent: str | None) -> None:
        """Point the node at another parent (None: no parent). UnknownNode if it is absent."""
        change = [(ldap3.MODIFY_REPLACE, [parent] if parent else [])]
        self._call("modify", name, self._dn(name), {"llmParentName": change})

    def unregister(self, name: str) -> None:
        """Delete the node's entry; nothing happens if it is already gone."""
        self._call("delete", name, self._dn(name), tolerate=(NO_SUCH_OBJECT,))
        logger.info("node %r unregistered", name)

    def _refresh(self, name: str, dn: str) -> None:
        request = _RefreshRequest()
        request["entryName"] = dn.encode()
        request["requestTtl"] = self.settings.node_ttl_s
        self._call("extended", name, REFRESH_OID, encoder.encode(request), no_encode=True)

    # -- reads (anonymous) -------------------------------------------------------------------
    def lookup(self, name: str) -> NodeRecord:
        """The node's record; UnknownNode if no node of that name is registered."""
        if not _storable(name):  # NUL, lone surrogates, huge: no entry can have such a name
            raise UnknownNode(f"no node named {name[:80]!r} in the directory at {self.url}")
        dn = self._dn(name)
        _, entries = self._call(
            "search", name, dn, "(objectClass=llmNode)", ldap3.BASE, attributes=NODE_ATTRIBUTES
        )
        if not entries:
            raise UnknownNode(f"no node named {name!r} in the directory at {self.url}")
        return NodeRecord.from_ldap(entries[0]["attributes"])

    def children(self, name: str) -> list[NodeRecord]:
        """The nodes whose parent is ``name``, sorted by name."""
        return self._search(f"(&(objectClass=llmNode)(llmParentName={escape_filter_chars(name)}))")

    def list_nodes(self) -> list[NodeRecord]:
        """Every registered node, sorted by name."""
        return self._search("(objectClass=llmNode)")

    def _search(self, query: str) -> list[NodeRecord]:
        records: list[NodeRecord] = []
        cookie: bytes | None = None
        base = self.settings.nodes_dn
        while True:  # paged, so the server's size limit never cuts the list short
            page: dict[str, Any] = {"attributes": NODE_ATTRIBUTES, "paged_size": PAGE_SIZE}
            page["paged_cookie"] = cookie
            try:
                result, entries = self._call("search", base, base, query, ldap3.LEVEL, **page)
            except UnknownNode as exc:
                raise RegistryError(f"{base} is missing at {self.url}: llmtree ldap init") from exc
            records += [NodeRecord.from_ldap(entry["attributes"]) for entry in entries]
            control = (result.get("controls") or {}).get(PAGED_RESULTS_OID) or {}
            if not (cookie := (control.get("value") or {}).get("cookie")):
                return sorted(records, key=lambda record: record.name)

    # -- plumbing ----------------------------------------------------------------------------
    def _dn(self, name: str) -> str:
        if not name:
            raise InvalidRequest("a node name must not be empty", param="name")
        return f"cn={escape_rdn(name)},{self.settings.nodes_dn}"

    def _call(
        self, method: str, name: str, *args: Any, tolerate: tuple[int, ...] = (), **kwargs: Any
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Run one ldap3 operation; return (result, entries found) or raise what it means."""
        write = method != "search"
        conn = self._writer if write else self._reader
        if conn is None:
            raise RegistryError(f"registry not connected for {'writing' if write else 'reading'}")
        with self._errors(f"{method} of {name!r}"):
            _, result, response, _ = getattr(conn, method)(*args, **kwargs)
        code: int = result["result"]
        if code == NO_SUCH_OBJECT and code not in tolerate:
            raise UnknownNode(f"no node named {name!r} in the directory at {self.url}")
        if code != SUCCESS and code not in tolerate:
            raise RegistryError(
                f"LDAP {method} of {name!r} at {self.url} failed:"
                f" {result['description']} ({result['message']})"
            )
        entries = [entry for entry in response or [] if entry.get("type") == "searchResEntry"]
        return result, entries

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Translate ldap3 (and socket) exceptions into RegistryError at this boundary."""
        try:
            yield
        except LlmTreeError:
            raise
        except Exception as exc:  # ldap3, sockets, and a non-LDAP peer's KeyError
            raise RegistryError(
                f"LDAP {action} at {self.url} failed ({_reason(exc)});"
                " is slapd running? try: llmtree ldap start"
            ) from exc


def _storable(name: str) -> bool:
    """Whether ``name`` could be an entry's cn at all (printable UTF-8, at most 255 characters)."""
    if not 0 < len(name) <= 255 or not name.isprintable():
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
