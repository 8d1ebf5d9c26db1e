"""``llmtree certs``: a project CA and certificates that verify against it (pure, no network)."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from llmtree.certs import ensure_local, init_ca, issue
from llmtree.errors import ConfigError


def test_ca_and_certificate(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    ca = init_ca(certs)
    made = issue(certs, "node-1", ["10.1.2.3", "node-1.lan"])
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    for key in (ca.key, made.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(made.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "10.1.2.3"}
    assert "node-1.lan" in san.get_values_for_type(x509.DNSName)
    # a TLS context trusting only the CA accepts the certificate and its key
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(made.cert, made.key)
    context.load_verify_locations(cafile=ca.cert)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert.read_bytes()))


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="certs init"):
        issue(tmp_path, "node")
    init_ca(tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        init_ca(tmp_path)
    for bad in ("ca", "a b", "../x", ""):
        with pytest.raises(ConfigError):
            issue(tmp_path, bad)
    with pytest.raises(ConfigError, match="bad host"):
        issue(tmp_path, "n", ["a/b"])


def test_ensure_local_makes_them_once(tmp_path: Path) -> None:
    first = ensure_local(tmp_path)
    before = first.cert.read_bytes()
    assert ensure_local(tmp_path).cert.read_bytes() == before
