"""autoresearch-mcp: the research loop of autoresearch as MCP tools."""

__version__ = "0.1.0"
