"""The HTTP door: FastAPI over the one engine. It only translates HTTP into runs and back.

Laid out as FastAPI's full-stack template does: `app` (the lifespan and `serve`), `deps`
(what routes take), `auth`, `admission`, `service` (the state the lifespan builds),
`streaming`, `errors`, and one module per resource under `routes/`.

`autocoder serve` calls `serve(settings)`; `uvicorn autocoder.api:app` works too, because
`app` holds no state until its lifespan starts: the settings, the kernel pool, the runner
and the run index are built there and kept on `app.state.service`.
"""

from autocoder.api.app import create_app, serve

app = create_app()

__all__ = ["app", "create_app", "serve"]
