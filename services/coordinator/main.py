"""``far-mesh coordinator``: serve the coordinator with uvicorn."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import uvicorn

from services.common.config import CoordinatorSettings, get_settings
from services.common.logs import configure_logging
from services.coordinator.app import create_app


def run(*, host: str, port: int, model_path: Optional[Path] = None) -> None:
    settings = get_settings(CoordinatorSettings)
    configure_logging(settings.LOG_LEVEL)
    from services.models.catalog import ModelUnavailable
    from services.models.hub import prepare_model

    try:  # before serving: a catalog model is built once, a hub model's config is fetched (clear line on failure)
        source = prepare_model(settings.DEFAULT_MODEL_ID, model_path or settings.FAR_MESH_MODEL_PATH or None)
    except ModelUnavailable as error:
        print(f"far-mesh coordinator: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    app = create_app(settings, model_path=source, port=port)
    uvicorn.run(app, host=host, port=port, log_config=None, timeout_graceful_shutdown=10)
