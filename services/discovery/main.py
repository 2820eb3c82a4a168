"""``far-mesh discovery``: serve the discovery service with uvicorn."""

from __future__ import annotations

import uvicorn

from services.common.config import DiscoverySettings, get_settings
from services.common.logs import configure_logging, get_logger
from services.discovery.app import create_app
from services.discovery.models import ModelConfigError, known_models


def run(*, host: str, port: int) -> None:
    settings = get_settings(DiscoverySettings)
    configure_logging(settings.LOG_LEVEL)
    try:
        models = known_models(settings)
    except ModelConfigError as error:
        raise SystemExit(f"far-mesh discovery: configuration error: {error}") from None
    if not models:
        get_logger(__name__).warning("no model configured: set FAR_MESH_MODEL_PATH or DISCOVERY_MODELS")
    app = create_app(settings, models=models)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=10,
                loop="uvloop")
