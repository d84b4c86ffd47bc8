"""Who may do what: scoped bearer tokens for gRPC (and /metrics), checked in constant time.

A tokens file has one token a line: ``SCOPE NAME SECRET`` (``#`` starts a comment).
Scopes: ``agent`` may only report, ``read`` may only query, ``admin`` may query and
change the fleet's state. Secrets are never logged; names are.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

AGENT, READ, ADMIN = "agent", "read", "admin"
SCOPES = (AGENT, READ, ADMIN)
# What each scope may do, in terms of the scopes that RPCs require.
GRANTS = {AGENT: {AGENT}, READ: {READ}, ADMIN: {READ, ADMIN}}
# The scope each service requires; services not listed (health, reflection) are open.
SERVICE_SCOPES = {
    "gpufleet.v1.IngestService": AGENT,
    "gpufleet.v1.QueryService": READ,
    "gpufleet.v1.AdminService": ADMIN,
}
MIN_SECRET_LENGTH = 16


class TokensFileError(Exception):
    """The tokens file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Token:
    scope: str
    name: str
    digest: bytes


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Tokens:
    def __init__(self, tokens: list[Token]) -> None:
        self._tokens = tokens

    @classmethod
    def from_file(cls, path: Path) -> Tokens:
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise TokensFileError(f"cannot read tokens file {path}: {exc.strerror}") from exc
        tokens = []
        for number, raw_line in enumerate(lines, 1):
            parts = raw_line.split("#", 1)[0].split()
            if not parts:
                continue
            if len(parts) != 3 or parts[0] not in SCOPES:
                raise TokensFileError(
                    f"{path}:{number}: expected 'SCOPE NAME SECRET' with SCOPE one of {', '.join(SCOPES)}"
                )
            scope, name, secret = parts
            if len(secret) < MIN_SECRET_LENGTH:
                raise TokensFileError(
                    f"{path}:{number}: the secret of {name!r} is shorter than {MIN_SECRET_LENGTH} characters"
                )
            tokens.append(Token(scope, name, _digest(secret)))
        if not tokens:
            raise TokensFileError(f"{path} holds no tokens")
        return cls(tokens)

    def find(self, secret: str) -> Token | None:
        """The token with this secret; every token is compared, in constant time."""
        digest = _digest(secret)
        found = None
        for token in self._tokens:
            if hmac.compare_digest(token.digest, digest):
                found = token
        return found

    def deny(self, secret: str | None, scope: str) -> tuple[grpc.StatusCode, str] | None:
        """Why a request bearing ``secret`` may not do what needs ``scope``; None if it may."""
        if not secret:
            return grpc.StatusCode.UNAUTHENTICATED, "no token: send 'authorization: Bearer <token>'"
        token = self.find(secret)
        if token is None:
            return grpc.StatusCode.UNAUTHENTICATED, "unknown token"
        if scope not in GRANTS[token.scope]:
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"a {token.scope} token may not do what needs a {scope} token",
            )
        return None


def bearer(value: str | None) -> str | None:
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


def _rejecting_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> Any:
    async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject)
    return grpc.unary_unary_rpc_method_handler(reject)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without a token of the scope their service needs."""

    def __init__(self, tokens: Tokens, on_denied: Callable[[str], None]) -> None:
        self._tokens = tokens
        self._on_denied = on_denied

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]], details: Any
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        service = details.method.lstrip("/").split("/", 1)[0]
        scope = SERVICE_SCOPES.get(service)
        if scope is None or handler is None:
            return handler
        metadata = dict(details.invocation_metadata or ())
        denial = self._tokens.deny(bearer(metadata.get("authorization")), scope)
        if denial is None:
            return handler
        self._on_denied(scope)
        return _rejecting_handler(handler, *denial)


class BasicAuth:
    """``user:password`` lines for HTTP basic auth on /metrics, compared in constant time."""

    def __init__(self, path: Path) -> None:
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise TokensFileError(f"cannot read basic-auth file {path}: {exc.strerror}") from exc
        self._digests = [_digest(line.strip()) for line in lines if ":" in line and not line.startswith("#")]
        if not self._digests:
            raise TokensFileError(f"{path} holds no 'user:password' lines")

    def allows(self, authorization: str | None) -> bool:
        if not authorization or authorization[:6].lower() != "basic ":
            return False
        try:
            pair = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return False
        digest = _digest(pair)
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(known, digest)
        return found


@dataclass(frozen=True)
class ServerSecurity:
    """TLS for gRPC and HTTP, client certificates, tokens; each optional (docs/security.md)."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Require client certificates signed by this CA (gRPC).
    client_ca: Path | None = None
    tokens: Tokens | None = None
    # /metrics requires a read (or admin) token, or basic auth.
    metrics_token: bool = False
    metrics_basic_auth: BasicAuth | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def grpc_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls_key.read_bytes(), self.tls_cert.read_bytes())],
            root_certificates=self.client_ca.read_bytes() if self.client_ca else None,
            require_client_auth=self.client_ca is not None,
        )

    def peer_credentials(self) -> grpc.ChannelCredentials | None:
        """How this collector calls the other collectors of its tier: with TLS, presenting its own
        certificate, and checking theirs against --tls-client-ca (or the system's CAs)."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.client_ca.read_bytes() if self.client_ca else None,
            private_key=self.tls_key.read_bytes(),
            certificate_chain=self.tls_cert.read_bytes(),
        )

    def http_ssl_context(self) -> ssl.SSLContext | None:
        """TLS for the HTTP endpoints, with the same certificate as gRPC."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def http_allows(self, authorization: str | None) -> bool:
        """Whether a /metrics request may be answered."""
        if self.metrics_basic_auth is not None and self.metrics_basic_auth.allows(authorization):
            return True
        if self.metrics_token and self.tokens is not None:
            return self.tokens.deny(bearer(authorization), READ) is None
        return not (self.metrics_token or self.metrics_basic_auth)
