"""The node directory against a real slapd: CRUD, names, ACLs, TTL expiry, failures."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import ldap3
import pytest

from llmtree.config import Settings
from llmtree.errors import NameTaken, RegistryError, UnknownNode
from llmtree.registry import NodeRecord, Registry
from llmtree.slapd import PrivateSlapd

from conftest import make_settings

pytestmark = pytest.mark.ldap

SPECIAL_NAMES = ["a,b", "x*)(cn=*", "back\\slash", "=eq", "#hash", " pad ", "plus+sign", 'q"uote']


def node(name: str, port: int, parent: str | None = None, **fields: Any) -> NodeRecord:
    return NodeRecord(name=name, uri=f"PYRO:llmtree.node@127.0.0.1:{port}", parent=parent, **fields)


def wait_for(condition: Callable[[], bool], timeout_s: float) -> float:
    """Poll ``condition`` until it holds; return the seconds it took, fail after ``timeout_s``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"condition not met within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


def is_gone(registry: Registry, name: str) -> bool:
    try:
        registry.lookup(name)
    except UnknownNode:
        return True
    return False


def raw_connection(settings: Settings, user: str | None = None) -> ldap3.Connection:
    """A plain ldap3 connection, to check the server's ACLs without our code in the way."""
    password = settings.service_password() if user else None
    return ldap3.Connection(
        ldap3.Server(settings.ldap_url), user=user, password=password, auto_bind=True
    )


def test_round_trip(registry: Registry) -> None:
    registry.register(node("root", 9100, capacity=0, host="127.0.0.1", model="smollm2"))
    registry.register(node("b", 9102, parent="root", capacity=4))
    registry.register(node("a", 9101, parent="root", capacity=2))

    root = registry.lookup("root")
    assert (root.uri, root.host, root.parent, root.model) == (
        "PYRO:llmtree.node@127.0.0.1:9100",
        "127.0.0.1",
        None,
        "smollm2",
    )
    assert root.status == "idle" and root.load == 0
    assert root.heartbeat is not None
    assert abs(root.heartbeat - datetime.now(UTC)) < timedelta(seconds=30)
    assert root.ttl is not None and 0 < root.ttl <= 2
    assert [child.name for child in registry.children("root")] == ["a", "b"]
    assert registry.lookup("a").capacity == 2
    assert {"a", "b", "root"} <= {record.name for record in registry.list_nodes()}
    json.dumps(root.to_dict())  # JSON-able as it is

    registry.heartbeat("a", load=2, status="busy", capacity=3)
    a = registry.lookup("a")
    assert (a.load, a.status, a.capacity) == (2, "busy", 3)

    registry.set_parent("b", "a")
    assert [child.name for child in registry.children("a")] == ["b"]
    assert [child.name for child in registry.children("root")] == ["a"]
    registry.set_parent("b", None)
    assert registry.lookup("b").parent is None

    registry.unregister("b")
    registry.unregister("b")  # idempotent
    with pytest.raises(UnknownNode, match="no node named 'b'"):
        registry.lookup("b")
    with pytest.raises(UnknownNode):
        registry.set_parent("b", "root")


def test_duplicate_live_name_is_refused(registry: Registry) -> None:
    registry.register(node("dup", 9200))
    with pytest.raises(NameTaken, match="already registered and alive at .*:9200"):
        registry.register(node("dup", 9201))
    with pytest.raises(NameTaken):
        registry.register(node("dup", 9201), is_alive=lambda uri: True)
    assert registry.lookup("dup").uri.endswith(":9200")


def test_dead_owner_is_taken_over(registry: Registry) -> None:
    registry.register(node("phoenix", 9300, model="old"))
    asked: list[str] = []

    def is_alive(uri: str) -> bool:
        asked.append(uri)
        return False

    registry.register(node("phoenix", 9301), is_alive=is_alive)
    assert asked == ["PYRO:llmtree.node@127.0.0.1:9300"]
    taken = registry.lookup("phoenix")
    assert taken.uri.endswith(":9301") and taken.model == ""


def test_anonymous_reads_nodes_but_cannot_write(
    registry: Registry, slapd_settings: Settings
) -> None:
    registry.register(node("visible", 9400))
    anonymous = raw_connection(slapd_settings)
    assert anonymous.search(slapd_settings.nodes_dn, "(cn=visible)", attributes=["llmNodeURI"])
    assert anonymous.entries[0].llmNodeURI.value.endswith(":9400")

    dn = f"cn=visible,{slapd_settings.nodes_dn}"
    assert not anonymous.modify(dn, {"llmStatus": [(ldap3.MODIFY_REPLACE, ["down"])]})
    assert not anonymous.add(
        f"cn=intruder,{slapd_settings.nodes_dn}", ["llmNode"], {"llmNodeURI": "PYRO:x@1.2.3.4:1"}
    )
    assert not anonymous.delete(dn)
    # The service account and its password hash are invisible to anonymous readers.
    assert not anonymous.search(slapd_settings.service_dn, "(objectClass=*)", ldap3.BASE)
    anonymous.unbind()
    assert registry.lookup("visible").status == "idle"
    assert is_gone(registry, "intruder")


def test_service_account_cannot_write_outside_nodes(slapd_settings: Settings) -> None:
    service = raw_connection(slapd_settings, slapd_settings.service_dn)
    base, services = slapd_settings.ldap_base, f"ou=Services,{slapd_settings.ldap_base}"
    change = {"description": [(ldap3.MODIFY_REPLACE, ["pwned"])]}
    assert not service.modify(base, change)
    assert service.result["result"] == 50  # insufficientAccessRights
    assert not service.modify(services, change)
    assert not service.add(f"cn=evil,{services}", ["applicationProcess"], {"cn": "evil"})
    assert not service.modify(
        slapd_settings.service_dn, {"userPassword": [(ldap3.MODIFY_REPLACE, ["x"])]}
    )
    service.unbind()


def test_entry_expires_without_heartbeat(registry: Registry) -> None:
    registry.register(node("mortal", 9500))
    assert registry.lookup("mortal").ttl == 2
    took = wait_for(lambda: is_gone(registry, "mortal"), timeout_s=10)
    assert took < 6  # TTL 2 s; dds looks for expired entries every second
    with pytest.raises(UnknownNode):
        registry.heartbeat("mortal", load=0, status="idle")


def test_heartbeat_keeps_entry_alive(registry: Registry) -> None:
    registry.register(node("steady", 9600))
    until = time.monotonic() + 4.5  # over twice the TTL
    while time.monotonic() < until:
        registry.heartbeat("steady", load=1, status="busy")
        assert registry.lookup("steady").load == 1
        time.sleep(0.5)  # the heartbeat period, not a readiness wait
    wait_for(lambda: is_gone(registry, "steady"), timeout_s=10)


@pytest.mark.parametrize("name", SPECIAL_NAMES)
def test_special_names_round_trip(registry: Registry, name: str) -> None:
    registry.register(node(name, 9700))
    registry.register(node(f"child of {name}", 9701, parent=name))
    assert registry.lookup(name).name == name
    assert [child.name for child in registry.children(name)] == [f"child of {name}"]
    assert registry.lookup(f"child of {name}").parent == name
    assert name in {record.name for record in registry.list_nodes()}
    registry.unregister(name)
    assert is_gone(registry, name)


def test_filter_injection_matches_nothing_else(registry: Registry) -> None:
    registry.register(node("p", 9800))
    registry.register(node("c", 9801, parent="p"))
    registry.register(node("x*)(cn=*", 9802))
    assert registry.children("x*)(cn=*") == []
    assert registry.children("*") == []
    assert registry.children("p)(|(cn=*") == []
    with pytest.raises(UnknownNode):
        registry.lookup("*")
    with pytest.raises(UnknownNode):
        registry.lookup("p,ou=Nodes")


def test_registry_survives_a_slapd_restart(tmp_path: Path, free_port: int) -> None:
    settings = make_settings(tmp_path, free_port, node_ttl_s=60)
    server = PrivateSlapd(settings, nosync=True)
    server.init()
    child = server.popen()
    registry = Registry(settings)
    try:
        server.wait_ready()
        registry.connect()
        registry.register(node("survivor", 9950))
        child.terminate()
        child.wait(timeout=10)
        with pytest.raises(RegistryError, match="is slapd running"):
            registry.heartbeat("survivor", load=0, status="idle")
        child = server.popen()
        server.wait_ready()
        registry.heartbeat("survivor", load=3, status="busy")  # the same Registry reconnects
        assert registry.lookup("survivor").load == 3
    finally:
        registry.close()
        child.terminate()
        child.wait(timeout=10)


def test_one_registry_is_shared_by_threads(registry: Registry) -> None:
    names = [f"t{index}" for index in range(4)]
    for index, name in enumerate(names):
        registry.register(node(name, 9960 + index, parent="hub"))

    def work(name: str) -> None:
        for load in range(20):
            registry.heartbeat(name, load=load, status="busy")
            assert registry.lookup(name).name == name
            assert len(registry.children("hub")) == len(names)

    with ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(work, names))
    assert [registry.lookup(name).load for name in names] == [19] * len(names)


def test_unreachable_server_fails_fast(tmp_path: Path, free_port: int) -> None:
    settings = make_settings(tmp_path, free_port, ldap_timeout_s=1.0)
    registry = Registry(settings, password="whatever")
    start = time.monotonic()
    with pytest.raises(RegistryError, match="is slapd running\\? try: llmtree ldap start"):
        registry.connect()
    assert time.monotonic() - start < 3


def test_wrong_or_missing_password(slapd_settings: Settings) -> None:
    with pytest.raises(RegistryError, match="invalidCredentials"):
        Registry(slapd_settings, password="not-the-password").connect()
    with pytest.raises(RegistryError, match="no password"):
        Registry(slapd_settings, password="").connect()
    reader = Registry(slapd_settings, password="")
    reader.connect(writer=False)
    assert isinstance(reader.list_nodes(), list)
    with pytest.raises(RegistryError, match="not connected for writing"):
        reader.register(node("nope", 9900))
    reader.close()


def test_anonymous_and_unauthenticated_binds_cannot_write_anywhere(
    registry: Registry, slapd_settings: Settings
) -> None:
    registry.register(node("guarded", 9900))
    dn = f"cn=guarded,{slapd_settings.nodes_dn}"
    base, services = slapd_settings.ldap_base, f"ou=Services,{slapd_settings.ldap_base}"
    anonymous = raw_connection(slapd_settings)
    assert not anonymous.modify_dn(dn, "cn=renamed")
    assert not anonymous.modify(base, {"description": [(ldap3.MODIFY_REPLACE, ["pwned"])]})
    assert not anonymous.add(f"cn=evil,{services}", ["applicationProcess"], {"cn": "evil"})
    assert not anonymous.modify(dn, {"llmNodeURI": [(ldap3.MODIFY_REPLACE, ["PYRO:x@6.6.6.6:1"])]})
    anonymous.unbind()
    # an "unauthenticated" simple bind (the service DN, an empty password; ldap3 will not send
    # one, OpenLDAP's client will) gets no further than anonymous
    change = f"dn: {dn}\nchangetype: modify\nreplace: llmStatus\nllmStatus: down\n"
    out = subprocess.run(
        ["ldapmodify", "-x", "-H", slapd_settings.ldap_url, "-D", slapd_settings.service_dn]
        + ["-w", ""],
        input=change,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0, out.stdout
    print(f"\nunauthenticated bind + write: {out.stderr.strip()}")
    assert registry.lookup("guarded").uri.endswith(":9900")
    assert registry.lookup("guarded").status == "idle"
    assert is_gone(registry, "renamed") and is_gone(registry, "evil")


@pytest.mark.parametrize("name", ["x,ou=Services", "cn=y,ou=Nodes", "z+cn=w"])
def test_dn_metacharacters_stay_inside_ou_nodes(
    registry: Registry, slapd_settings: Settings, name: str
) -> None:
    registry.register(node(name, 9910))
    conn = raw_connection(slapd_settings)
    conn.search(slapd_settings.nodes_dn, "(objectClass=llmNode)", ldap3.LEVEL, attributes=["cn"])
    entry = [e for e in conn.entries if e.cn.value == name]
    assert len(entry) == 1 and entry[0].entry_dn.endswith(f",{slapd_settings.nodes_dn}")
    parts = ldap3.utils.dn.parse_dn(entry[0].entry_dn)
    assert len(parts) == len(ldap3.utils.dn.parse_dn(slapd_settings.nodes_dn)) + 1  # one RDN more
    services = f"ou=Services,{slapd_settings.ldap_base}"
    conn.search(services, "(objectClass=*)", ldap3.SUBTREE)
    assert all(not e.entry_dn.startswith(("cn=x", "cn=y", "cn=z")) for e in conn.entries)
    conn.unbind()


@pytest.mark.parametrize("name", [*SPECIAL_NAMES, "nul\x00", "new\nline", "x" * 64, "", "-lead"])
def test_the_cli_refuses_names_with_metacharacters(name: str) -> None:
    from llmtree.cli import check_name
    from llmtree.errors import ConfigError

    with pytest.raises(ConfigError):
        check_name(name)
