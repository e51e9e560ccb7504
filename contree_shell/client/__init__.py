"""The Contree API v1 client: `api` (requests, SSE), `runner` (one live command),
`stdin` (local input sources), `local` (starting the local server), `errors`.

Import the submodules directly; this package imports nothing so that loading an error
class does not pull in httpx.
"""
