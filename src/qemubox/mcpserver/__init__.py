"""``qemubox mcp``: the tools of both doors — sandboxes for AI agents, kernels for kernel
developers — over the Model Context Protocol, on the official ``mcp`` SDK. ``tools`` does
the work on the service layer (plain functions, plain results); ``server`` is the MCP door:
schemas, progress notifications, tool errors, stdio and streamable HTTP."""
