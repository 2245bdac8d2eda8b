"""Streamable HTTP transport: loopback by default; anywhere else only behind a bearer token.

DNS rebinding (a web page making the browser talk to 127.0.0.1) is stopped by checking Host and Origin; a
server reachable from other machines additionally demands `Authorization: Bearer <token>` on every request.
"""

import hmac
import ipaddress
import os
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from server.errors import WorkspaceError

TOKEN_ENV = "AUTORESEARCH_TOKEN"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_token(token_file: str | None) -> str | None:
    """The bearer token from --token-file, else from $AUTORESEARCH_TOKEN; None when neither is set."""
    if token_file:
        try:
            token = Path(token_file).expanduser().read_text().strip()
        except OSError as e:
            raise WorkspaceError(f"Cannot read the token file {token_file}: {e.strerror}.") from e
        if not token:
            raise WorkspaceError(f"The token file {token_file} is empty; put a long random token in it.")
        return token
    return os.environ.get(TOKEN_ENV) or None


def security_settings(host: str) -> TransportSecuritySettings:
    hosts = [f"{name}:*" for name in LOOPBACK_NAMES] + list(LOOPBACK_NAMES)
    origins = [f"http://{name}" for name in LOOPBACK_NAMES] + [f"http://{name}:*" for name in LOOPBACK_NAMES]
    if not is_loopback(host):
        if host in ("0.0.0.0", "::"):
            # any interface: clients use whatever name reaches it, so the token alone guards the door
            return TransportSecuritySettings(enable_dns_rebinding_protection=False)
        hosts += [host, f"{host}:*"]
        origins += [f"http://{host}", f"http://{host}:*", f"https://{host}", f"https://{host}:*"]
    return TransportSecuritySettings(allowed_hosts=hosts, allowed_origins=origins)


class BearerTokenMiddleware:
    """Rejects every HTTP request that does not carry the token (compared in constant time)."""

    def __init__(self, app, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await send({
                    "type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"Bearer")],
                })
                await send({"type": "http.response.body", "body": b"missing or wrong bearer token\n"})
                return
        await self.app(scope, receive, send)


def http_app(mcp: MCPServer, host: str, token: str | None):
    """The ASGI app to serve; refuses a non-loopback bind without a token."""
    if not is_loopback(host) and not token:
        raise WorkspaceError(
            f"Refusing to listen on {host} without a bearer token: set {TOKEN_ENV} or pass --token-file, "
            "or bind 127.0.0.1."
        )
    app = mcp.streamable_http_app(transport_security=security_settings(host), host=host)
    return BearerTokenMiddleware(app, token) if token else app


def run_http(mcp: MCPServer, host: str, port: int, token: str | None) -> None:
    import uvicorn

    uvicorn.run(http_app(mcp, host, token), host=host, port=port, log_level="warning")
