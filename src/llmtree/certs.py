"""The project CA and the certificates nodes and gateways use for mutual TLS over Pyro5.

    llmtree certs init [--force]          a CA: <certs_dir>/ca.crt and ca.key (0600)
    llmtree certs issue NAME [--host H]   NAME.crt and NAME.key signed by that CA

A certificate is valid as TLS server and client (a node is both); its subjectAltName lists the
addresses peers dial (the host in a Pyro5 URI is checked against it): 127.0.0.1, ::1 and
localhost always, plus every ``--host``. Keys are EC P-256, written 0600 in a 0700 directory.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from llmtree.errors import ConfigError

CA_DAYS: Final = 3650
CERT_DAYS: Final = 825
LOCAL_HOSTS: Final = ("127.0.0.1", "::1", "localhost")
CERT_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
HOST_PATTERN: Final = r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$"


@dataclass(frozen=True, slots=True)
class Issued:
    cert: Path
    key: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a file only its owner can read (created 0600, never wider)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _prepare_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)


def ca_paths(directory: Path) -> Issued:
    return Issued(directory / "ca.crt", directory / "ca.key")


def init_ca(directory: Path, force: bool = False, name: str = "llmtree project CA") -> Issued:
    """Create the project CA in ``directory``; refuses to replace one unless ``force``."""
    paths = ca_paths(directory)
    if paths.cert.exists() and not force:
        raise ConfigError(f"a CA already exists at {paths.cert}; use --force to replace it")
    _prepare_dir(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llmtree"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(paths.key, _key_pem(key))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    paths = ca_paths(directory)
    if not paths.cert.exists() or not paths.key.exists():
        raise ConfigError(f"no CA in {directory}; run `llmtree certs init` first")
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{paths.key} is not an EC key made by `llmtree certs init`")
    return cert, key


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*LOCAL_HOSTS, *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.match(HOST_PATTERN, host):
                raise ConfigError(f"bad host {host!r}: give an IP address or a DNS name") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue(directory: Path, name: str, hosts: list[str] | None = None) -> Issued:
    """A certificate and key for ``name``, signed by the CA in ``directory`` (replaces old ones)."""
    if not re.match(CERT_NAME_PATTERN, name) or name == "ca":
        raise ConfigError(
            f"bad certificate name {name!r}: use 1-63 letters, digits, '.', '_' or '-' (not 'ca')"
        )
    ca_cert, ca_key = _load_ca(directory)
    san = _san(list(hosts or []))
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llmtree"),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(san, critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    issued = Issued(directory / f"{name}.crt", directory / f"{name}.key")
    _write_private(issued.key, _key_pem(key))
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return issued


def ensure_local(directory: Path, name: str = "node") -> Issued:
    """For ``llmtree up --tls``: the CA and one certificate for this machine, made once."""
    if not ca_paths(directory).cert.exists():
        init_ca(directory)
    issued = Issued(directory / f"{name}.crt", directory / f"{name}.key")
    if not issued.cert.exists() or not issued.key.exists():
        issued = issue(directory, name)
    return issued


def describe(path: Path) -> str:
    """One line about a certificate: subject, issuer, expiry, addresses."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts = [str(v) for v in san.get_values_for_type(x509.IPAddress)]
        hosts += san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        hosts = []
    return (
        f"{path}: {cert.subject.rfc4514_string()} issued by {cert.issuer.rfc4514_string()}, "
        f"valid until {cert.not_valid_after_utc:%Y-%m-%d}"
        + (f", hosts {', '.join(hosts)}" if hosts else "")
    )
