"""The HTTP transport: loopback by default, a bearer token on every request, Host/Origin checked (DNS rebinding)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from support import wait_for_port


TOKEN = "s3cret-token-for-tests"
INITIALIZE = json.dumps({
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {},
               "clientInfo": {"name": "test", "version": "0"}},
}).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(workspace, *extra) -> list[str]:
    return [sys.executable, "-m", "server.cli", "serve", "--workspace", str(workspace), "--profile", "smoke",
            "--dataset", "sotu", "--transport", "http", *extra]


def post(port: int, headers: dict) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/mcp", data=INITIALIZE, method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture
def http_server(workspace, prepared_cache, tmp_path):
    port = free_port()
    env = {**os.environ, "AUTORESEARCH_TOKEN": TOKEN, "AUTORESEARCH_CACHE": str(prepared_cache)}
    process = subprocess.Popen(serve_command(workspace, "--port", str(port)), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.2)
    yield port
    process.terminate()
    process.wait(timeout=10)


def test_refuses_to_listen_beyond_loopback_without_a_token(workspace, prepared_cache):
    env = {k: v for k, v in os.environ.items() if k != "AUTORESEARCH_TOKEN"}
    env["AUTORESEARCH_CACHE"] = str(prepared_cache)
    done = subprocess.run(serve_command(workspace, "--host", "0.0.0.0", "--port", str(free_port())),
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "AUTORESEARCH_TOKEN" in done.stderr and "127.0.0.1" in done.stderr


def test_every_request_needs_the_right_token(http_server, tally):
    assert post(http_server, {}) == 401
    assert post(http_server, {"Authorization": "Bearer wrong"}) == 401
    assert post(http_server, {"Authorization": TOKEN}) == 401  # the scheme is part of the secret
    tally.bad_input(3)
    assert post(http_server, {"Authorization": f"Bearer {TOKEN}"}) == 200


def test_foreign_origin_and_host_are_rejected(http_server, tally):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert post(http_server, {**auth, "Origin": "http://evil.example"}) == 403
    assert post(http_server, {**auth, "Host": "evil.example"}) == 421
    tally.bad_input(2)
    assert post(http_server, {**auth, "Origin": f"http://127.0.0.1:{http_server}"}) == 200


def test_prints_its_url_and_serves_the_dashboard_at_the_root(workspace, prepared_cache, tally):
    port = free_port()
    env = {**os.environ, "AUTORESEARCH_TOKEN": TOKEN, "AUTORESEARCH_CACHE": str(prepared_cache)}
    process = subprocess.Popen(serve_command(workspace, "--port", str(port)), env=env, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first_line = process.stderr.readline()
        assert f"http://127.0.0.1:{port}/mcp" in first_line, first_line
        assert f"dashboard http://127.0.0.1:{port}/" in first_line
        wait_for_port(process, port)

        def get(path, headers):
            try:
                with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers),
                                            timeout=10) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as e:
                return e.code, b""

        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert get("/", {})[0] == 401
        assert get("/?token=wrong", {})[0] == 401
        assert get(f"/mcp?token={TOKEN}", {})[0] == 401  # the MCP endpoint takes the token as a header only
        assert get("/", {**auth, "Host": "evil.example"})[0] == 421  # DNS rebinding
        tally.bad_input(4)
        status, page = get(f"/?token={TOKEN}", {})
        assert status == 200 and b"<title>autoresearch dashboard</title>" in page
        status, body = get("/api/state", auth)
        assert status == 200 and json.loads(body)["workspace"] == str(workspace)
        assert post(port, auth) == 200  # MCP still answers beside it
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_port_in_use_is_a_one_line_error(workspace, prepared_cache):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "AUTORESEARCH_CACHE": str(prepared_cache)}
        done = subprocess.run(serve_command(workspace, "--port", str(port)), env=env, capture_output=True,
                              text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"Port {port} on 127.0.0.1 is already in use: pass --port" in done.stderr
