"""Certificates for the simulator's HTTPS listeners: a local CA (reused across runs) and a server
certificate for the listening address, signed by it.

The CA's PEM is what a client trusts (``REQUESTS_CA_BUNDLE`` / ``connection_verify=``): TLS is verified
for real against the simulator, never switched off.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger(__name__)

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca-key.pem"


@dataclass(frozen=True)
class CertPaths:
    """Where the PEM files are: the CA certificate (to trust) and the server certificate chain + key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write_private(path: Path, data: bytes) -> None:
    # The key files are written 0600 from the start, not chmod-ed after the fact.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
    if not (cert_path.exists() and key_path.exists()):
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError:
        logger.warning("simulator CA in %s is unreadable; generating a new one", directory)
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    if cert.not_valid_after_utc < dt.datetime.now(dt.UTC) + dt.timedelta(days=1):
        logger.info("simulator CA in %s expires soon; generating a new one", directory)
        return None
    return key, cert


def _new_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Lead Writer simulator"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Lead Writer simulator CA"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(directory / CA_KEY_NAME, _key_pem(key))
    (directory / CA_CERT_NAME).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    logger.info("generated simulator CA in %s", directory)
    return key, cert


def ensure_certificates(directory: Path, host: str) -> CertPaths:
    """Create (or reuse) the CA under ``directory`` and issue a fresh server certificate for ``host``.

    The server certificate names IP ``host`` (or DNS ``host`` when it is not an IP address) and DNS
    ``localhost``. Raises OSError when the directory cannot be written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    loaded = _load_ca(directory)
    ca_key, ca_cert = loaded if loaded is not None else _new_ca(directory)

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        names.insert(0, x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        if host != "localhost":
            names.insert(0, x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    # One server certificate per listening address, so simulators on different loopback addresses
    # sharing a data dir do not overwrite each other's files.
    tag = host.replace(":", "_")
    server_cert = directory / f"server-{tag}.pem"
    server_key = directory / f"server-{tag}-key.pem"
    _write_private(server_key, _key_pem(key))
    server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CertPaths(ca_cert=directory / CA_CERT_NAME, server_cert=server_cert, server_key=server_key)
