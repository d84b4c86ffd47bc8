"""`gpufleet certs` and `gpufleet token`: a development CA, certificates and scoped tokens.

Good for trying mutual TLS and tokens end to end (docs/security.md). In production,
use your own PKI; the collector only needs PEM files.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gpufleet development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _save(directory: Path, stem: str, cert: x509.Certificate, key: Key) -> list[str]:
    (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        directory / f"{stem}.key",
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    return [f"{stem}.pem", f"{stem}.key"]


def _builder(subject: str, issuer: x509.Name, key: Key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def issue(
    directory: Path,
    *,
    server_names: list[str],
    server_ips: list[str],
    agents: list[str],
    clients: list[str],
    days: int = 365,
) -> list[str]:
    """Write ca.pem, server.pem/.key, agent-<id>.pem/.key, client-<name>.pem/.key; return their names."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        _builder("gpufleet development CA", _name("gpufleet development CA"), ca_key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    written = _save(directory, "ca", ca, ca_key)

    def leaf(stem: str, common_name: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            _builder(common_name, ca.subject, key, days)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        written.extend(_save(directory, stem, cert, key))

    names = server_names or ["localhost"]
    ips = server_ips or ([] if server_names else ["127.0.0.1"])
    leaf(
        "server",
        names[0],
        [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    for node_id in agents:
        # The node id is the certificate's identity: with --bind-node-id-to-cert the
        # collector accepts reports for this node id from this certificate only.
        leaf(f"agent-{node_id}", node_id, [x509.DNSName(node_id)], ExtendedKeyUsageOID.CLIENT_AUTH)
    for name in clients:
        leaf(f"client-{name}", name, [x509.DNSName(name)], ExtendedKeyUsageOID.CLIENT_AUTH)
    return written


def add_token(tokens_file: Path, scope: str, name: str, out: Path) -> None:
    """Append a new token to the collector's tokens file and write its secret to ``out`` (mode 0600)."""
    if any(c.isspace() for c in name) or not name:
        raise ValueError("the token's name cannot be empty or contain spaces")
    secret = secrets.token_urlsafe(32)
    _write_private(out, secret.encode() + b"\n")
    fd = os.open(tokens_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as handle:
        handle.write(f"{scope} {name} {secret}\n")


def run(args: argparse.Namespace) -> str:
    if args.command == "certs":
        files = issue(
            args.directory,
            server_names=args.server_name,
            server_ips=args.server_ip,
            agents=args.agent,
            clients=args.client,
            days=args.days,
        )
        return f"wrote to {args.directory}: " + ", ".join(files)
    add_token(args.tokens_file, args.scope, args.name, args.out)
    return f"added a {args.scope} token for {args.name} to {args.tokens_file}; its secret is in {args.out}"
