"""The agents' door: autocoder as an MCP server (the Model Context Protocol).

`server.py` holds the tools and the two ways in: stdio (`autocoder mcp`, what MCP clients
launch) and Streamable HTTP (mounted at `/mcp` by `autocoder serve`, on the API's engine).
Nothing here is imported by the CLI until `autocoder mcp` runs.
"""
