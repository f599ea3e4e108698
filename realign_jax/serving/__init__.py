"""The realignment server: a continuous-batching engine over the inference package, an ASGI app.

`engine` (slots, per-slot KV caches, one jitted step), `protocol` (the OpenAI
request bodies, checked), `metrics` (Prometheus), `app` (Starlette routes),
`server` (components loaded, uvicorn started). Only this package imports the
server's dependencies (starlette, uvicorn, prometheus-client).
"""
