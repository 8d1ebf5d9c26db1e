"""``llmtree ldap serve``: the private slapd in the foreground, for a container.

Initialises the directory on first start (``PrivateSlapd.init``), runs slapd as a child, and
when ``LLMTREE_LDAP_PASSWORD`` is set makes it the nodes' service account password (the rootDN
changes it over LDAP), so that every node and gateway of a deployment can take it from one
Secret. SIGTERM / SIGINT stop slapd; the exit status is slapd's.

Listen on every interface with ``LLMTREE_LDAP_URL=ldap://0.0.0.0:3389``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import Any
from urllib.parse import urlsplit

import ldap3
from ldap3.utils.hashed import hashed

from llmtree.config import Settings
from llmtree.errors import ConfigError
from llmtree.slapd import PrivateSlapd

logger = logging.getLogger(__name__)


def set_service_password(settings: Settings, slapd: PrivateSlapd, password: str) -> None:
    """Bind as the rootDN (``admin.secret``) and set the service account's password."""
    admin = (slapd.dir / "admin.secret").read_text().strip()
    host = slapd.host if slapd.host not in ("0.0.0.0", "::") else "127.0.0.1"
    server = ldap3.Server(f"ldap://{host}:{slapd.port}", connect_timeout=5, get_info=ldap3.NONE)
    conn = ldap3.Connection(
        server, f"cn=admin,{settings.ldap_base}", admin, receive_timeout=10, raise_exceptions=False
    )
    if not conn.bind():
        raise ConfigError(f"cannot bind as cn=admin to set the nodes' password: {conn.result}")
    try:
        digest = hashed(ldap3.HASHED_SALTED_SHA, password)
        conn.modify(settings.service_dn, {"userPassword": [(ldap3.MODIFY_REPLACE, [digest])]})
        if conn.result.get("result") != 0:
            raise ConfigError(f"cannot set the nodes' password: {conn.result}")
    finally:
        conn.unbind()
    secret = slapd.dir / "nodes.secret"
    with os.fdopen(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
        file.write(password)


def serve(settings: Settings) -> int:
    """Run slapd in the foreground until a signal; returns its exit status."""
    if urlsplit(settings.ldap_url).scheme != "ldap":
        raise ConfigError("llmtree ldap serve needs an ldap:// URL, e.g. ldap://0.0.0.0:3389")
    slapd = PrivateSlapd(settings)
    if not slapd.is_initialized():
        slapd.init()
        print(f"initialised {slapd.dir} (base {settings.ldap_base})", flush=True)
    child: subprocess.Popen[bytes] = slapd.popen()

    def stop(*_: Any) -> None:
        if child.poll() is None:
            child.terminate()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        slapd.wait_ready(30)
        if settings.ldap_password:
            set_service_password(settings, slapd, settings.ldap_password)
        print(f"slapd serving {settings.ldap_url} (base {settings.ldap_base})", flush=True)
        code = child.wait()
    except BaseException:
        stop()
        child.wait(10)
        raise
    if code not in (0, -signal.SIGTERM, -signal.SIGINT):
        log = slapd.log_file.read_text(errors="replace")[-2000:] if slapd.log_file.exists() else ""
        print(f"slapd exited with {code}: {log}", file=sys.stderr, flush=True)
        return 1
    return 0
