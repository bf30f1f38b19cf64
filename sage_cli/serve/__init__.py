"""Serving sage's operators: `sage serve` (an OpenAI-compatible HTTP API and NDJSON pipelines),
`sage chat` (a REPL), `sage mcp` (tools over the Model Context Protocol) and the studio.

The operators (Retriever, Prompt, Generate, Embed) are built once per process by
`engine.ChatEngine`; `batching.ModelWorker` is the one thread that calls them, gathering the
requests that wait together into one `process(batch)` call. Nothing here is imported by
`import sage_cli.app`: the web stack (starlette, uvicorn) loads only inside `app`.
"""
