"""Run the service: `uvicorn service.main:create_app --factory`, or `gradwatch up`."""

from __future__ import annotations

import logging

from service.api import create_app
from service.settings import Settings, check_bind


def serve(settings: Settings) -> None:
    """Serve the API until interrupted; refuses to start without a token, or on a wildcard address
    while only loopback Host names are allowed."""
    import uvicorn

    check_bind(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Streaming log followers would otherwise hold a graceful shutdown open until their jobs end.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )


__all__ = ["create_app", "serve"]
