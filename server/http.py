"""Streamable HTTP transport: loopback by default; anywhere else only behind a bearer token.

DNS rebinding (a web page making the browser talk to 127.0.0.1) is stopped by checking Host and Origin; a
server reachable from other machines additionally demands `Authorization: Bearer <token>` on every request.
The MCP endpoint is /mcp; the read-only dashboard (server/dashboard.py) answers at /.
"""

import errno
import hmac
import ipaddress
import os
import socket
import sys
from pathlib import Path
from urllib.parse import parse_qs

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from server.errors import WorkspaceError

TOKEN_ENV = "AUTORESEARCH_TOKEN"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
MCP_PATH = "/mcp"


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


def url_for(host: str, port: int, path: str) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}{path}"


def refuse_open_bind(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise WorkspaceError(
            f"Refusing to listen on {host} without a bearer token: set {TOKEN_ENV} or pass --token-file, "
            "or bind 127.0.0.1."
        )


def check_port(host: str, port: int) -> None:
    """Fail with what to type when the port is taken, before the web server would print its own traceback."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise WorkspaceError(f"Port {port} on {host} is already in use: pass --port with another number.") from e
            raise WorkspaceError(f"Cannot listen on {host}:{port}: {e.strerror}.") from e


class BearerTokenMiddleware:
    """Rejects every HTTP request that does not carry the token (compared in constant time). With query_token, a
    GET outside /mcp may carry it as ?token=... instead: a browser opening the dashboard cannot set a header."""

    def __init__(self, app, token: str, query_token: bool = False):
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.token = token.encode()
        self.query_token = query_token

    def in_query(self, scope) -> bool:
        if not self.query_token or scope.get("method") not in ("GET", "HEAD") or scope.get("path", "").startswith(MCP_PATH):
            return False
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[-1].encode("latin-1")
        return hmac.compare_digest(given, self.token)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected) and not self.in_query(scope):
                await send({
                    "type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"Bearer")],
                })
                await send({"type": "http.response.body", "body": b"missing or wrong bearer token\n"})
                return
        await self.app(scope, receive, send)


def http_app(mcp: MCPServer, host: str, token: str | None):
    """The ASGI app to serve: MCP at /mcp, the dashboard at /; refuses a non-loopback bind without a token."""
    from starlette.routing import Mount

    from server.dashboard import dashboard_app

    refuse_open_bind(host, token)
    app = mcp.streamable_http_app(transport_security=security_settings(host), host=host)
    app.router.routes.append(Mount("/", app=dashboard_app(mcp.research.root, host)))  # after /mcp: only the rest
    return BearerTokenMiddleware(app, token, query_token=True) if token else app


def run_http(mcp: MCPServer, host: str, port: int, token: str | None) -> None:
    import uvicorn

    app = http_app(mcp, host, token)
    check_port(host, port)
    # stdout is free on this transport, but stderr is where a person starting a server looks for its address
    print(f"autoresearch-mcp: MCP endpoint {url_for(host, port, MCP_PATH)}; dashboard {url_for(host, port, '/')}"
          + (" (bearer token required)" if token else ""), file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
