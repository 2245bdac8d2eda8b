"""The one error type the agent is meant to read: what went wrong and what to do about it."""


class WorkspaceError(Exception):
    """Raised for any refusal or failure the client should see verbatim (the MCP layer turns it into ToolError)."""
