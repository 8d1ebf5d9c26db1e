"""The private slapd: init, the daemonised start/stop, and the errors that say what to do."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import ldap3
import pytest

from llmtree.errors import ConfigError
from llmtree.slapd import PrivateSlapd, find_slapd

from conftest import make_settings

pytestmark = pytest.mark.ldap


def test_init_refuses_to_wipe_without_force(tmp_path: Path, free_port: int) -> None:
    server = PrivateSlapd(make_settings(tmp_path, free_port), nosync=True)
    assert not server.is_initialized()
    server.init()
    assert server.is_initialized()
    secret = server.dir / "nodes.secret"
    first = secret.read_text()
    assert len(first) >= 24
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((server.dir / "admin.secret").stat().st_mode) == 0o600

    with pytest.raises(ConfigError, match="--force"):
        server.init()
    assert secret.read_text() == first
    server.init(force=True)
    assert secret.read_text() != first


def test_init_never_wipes_a_foreign_dir(tmp_path: Path, free_port: int) -> None:
    settings = make_settings(tmp_path, free_port)
    settings.ldap_data_dir.mkdir()
    precious = settings.ldap_data_dir / "precious.txt"
    precious.write_text("keep me")
    with pytest.raises(ConfigError, match="not a slapd data dir"):
        PrivateSlapd(settings).init(force=True)
    assert precious.read_text() == "keep me"


def test_daemon_start_and_stop(tmp_path: Path, free_port: int) -> None:
    settings = make_settings(tmp_path, free_port)
    server = PrivateSlapd(settings, nosync=True)
    server.init()
    assert not server.is_running() and server.pid() is None
    pid = server.start()
    try:
        assert server.is_running() and server.pid() == pid
        assert server.start() == pid  # idempotent
        conn = ldap3.Connection(
            ldap3.Server(settings.ldap_url),
            settings.service_dn,
            settings.service_password(),
            auto_bind=True,
        )
        assert conn.extend.standard.who_am_i() == f"dn:{settings.service_dn}"
        conn.unbind()
    finally:
        assert server.stop() is True
    assert not server.is_running() and server.pid() is None
    assert server.stop() is False


def test_start_reports_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        server = PrivateSlapd(make_settings(tmp_path, squatter.getsockname()[1]), nosync=True)
        server.init()
        with pytest.raises(ConfigError, match="in use"):
            server.start(wait_s=5)
    assert not server.is_running()


def test_start_needs_init(tmp_path: Path, free_port: int) -> None:
    with pytest.raises(ConfigError, match="llmtree ldap init"):
        PrivateSlapd(make_settings(tmp_path, free_port)).start()


def test_find_slapd_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bogus = tmp_path / "no-such-slapd"
    with pytest.raises(ConfigError, match="apt-get install slapd ldap-utils") as error:
        find_slapd(bogus)
    assert str(bogus) in str(error.value)
    monkeypatch.setenv("LLMTREE_SLAPD", str(bogus))
    with pytest.raises(ConfigError, match="slapd not found"):
        find_slapd()
    monkeypatch.delenv("LLMTREE_SLAPD")
    assert find_slapd().name == "slapd"
