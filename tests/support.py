"""Helpers the tests share: a git query and a tool call that must succeed."""

import subprocess


def git(workspace, *args) -> str:
    return subprocess.run(["git", "-C", str(workspace), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


async def call(client, name, **arguments) -> dict:
    """Call a tool that must succeed; returns its structured answer."""
    result = await client.call_tool(name, arguments)
    assert not result.is_error, result.content[0].text
    return result.structured_content
