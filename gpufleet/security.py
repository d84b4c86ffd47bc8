"""Client side of TLS and tokens: how agents and the CLI reach a protected collector."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gpufleet.settings import add_flag, pem_file, readable_file


class SecuritySettingsError(Exception):
    """A certificate, key or token file cannot be used; the message says which and why."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecuritySettingsError(f"cannot read {what} {path}: {exc.strerror}") from exc


@dataclass(frozen=True)
class ClientSecurity:
    """TLS (optionally with a client certificate) and a bearer token, each optional."""

    tls: bool = False
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: str | None = None

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def aio_channel(self, target: str, options: list[tuple[str, int]]) -> grpc.aio.Channel:
        credentials = self.credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)

    def channel(self, target: str, options: list[tuple[str, int]]) -> grpc.Channel:
        credentials = self.credentials()
        if credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, credentials, options=options)


def add_client_security_flags(parser: argparse._ActionsContainer) -> None:
    add_flag(parser, "--tls", action="store_true", help="connect with TLS (implied by --tls-ca)")
    add_flag(
        parser,
        "--tls-ca",
        default="",
        type=pem_file,
        help="CA certificate to verify the collector with (PEM)",
    )
    add_flag(parser, "--tls-cert", default="", type=pem_file, help="client certificate for mutual TLS (PEM)")
    add_flag(
        parser, "--tls-key", default="", type=pem_file, help="the client certificate's private key (PEM)"
    )
    add_flag(
        parser,
        "--token-file",
        default="",
        type=readable_file,
        help="file holding a bearer token for the collector",
    )


def client_security(args: Any) -> ClientSecurity:
    """The settings the flags name, with every file read now (so errors show at start)."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SecuritySettingsError("--tls-cert and --tls-key go together")
    token = _read(args.token_file, "token file").decode().strip() if args.token_file else None
    if args.token_file and not token:
        raise SecuritySettingsError(f"token file {args.token_file} is empty")
    return ClientSecurity(
        tls=bool(args.tls or args.tls_ca or args.tls_cert),
        ca=_read(args.tls_ca, "CA certificate") if args.tls_ca else None,
        cert=_read(args.tls_cert, "certificate") if args.tls_cert else None,
        key=_read(args.tls_key, "private key") if args.tls_key else None,
        token=token,
    )
