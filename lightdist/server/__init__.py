"""``lightdist serve``: a warm pool that outlives its clients, with a job API (docs/server.md).

- :mod:`._serve`    the command: state directory, token, socket, uvicorn, pool start and stop
- :mod:`._app`      the HTTP API (Starlette): requests, server-sent events
- :mod:`._auth`     the token gate: bearer, login link and cookie, CSRF checks, security headers
- :mod:`._dashboard` the dashboard: pages, static files (`static/`), configs, artifact downloads
- :mod:`._jobs`     the queue: one job at a time on the pool, cancel, attach, restart recovery
- :mod:`._cli_job`  a ``lightdist fit/...`` command line run as a job (LightningCLI)
- :mod:`._store`    jobs and events in SQLite
- :mod:`._events`   the API's event names and back
- :mod:`._client`   the standard-library client every other client uses

Nothing here is imported by ``import lightdist``; the client modules import neither torch nor
Lightning.
"""
