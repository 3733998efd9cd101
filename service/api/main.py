"""Run the service: `uvicorn service.api.main:create_app --factory`, or `gradwatch up`."""

from __future__ import annotations

import logging

from service.api.routes import create_app
from service.api.serving import server_config
from service.settings import Settings, check_bind


def serve(settings: Settings) -> None:
    """Serve the API until interrupted; refuses to start without a token, or on a wildcard address
    while only loopback Host names are allowed. Headers must arrive within `header_timeout` and at most
    `max_connections` connections are served at once (service/api/serving.py)."""
    import uvicorn

    check_bind(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Streaming log followers would otherwise hold a graceful shutdown open until their jobs end.
    uvicorn.Server(server_config(create_app(settings), settings)).run()


__all__ = ["create_app", "serve"]
