"""The serving front behind `python -m slmkit.serve`, split by role as vLLM's `entrypoints/openai`:
`cli` (flags), `settings` (what the CLI hands the workers), `app` (the factory), `routes`,
`protocol` (OpenAI's shapes), `metrics` (Prometheus) and `middleware` (body limit, counting).
"""
