"""The service layer: every action qemubox offers, as plain data (``actions``) performed by
plain functions over the floors below. The command line — and any other door: an HTTP API,
an MCP server — only parses its input into these actions and shows their results; it holds
no use case of its own.

``session`` turns the options every door shares into a Session, ``command`` runs a command
in a sandbox with its output streamed and its exit status returned, ``outcome`` maps an
error to an exit status and the lines a user is shown, ``actions`` is the list."""
