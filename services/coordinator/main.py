"""``far-mesh coordinator``: serve the coordinator with uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import uvicorn

from services.common.config import get_settings
from services.common.logs import configure_logging
from services.coordinator.app import create_app


def run(*, host: str, port: int, model_path: Optional[Path] = None) -> None:
    settings = get_settings()
    configure_logging(settings.LOG_LEVEL)
    app = create_app(settings, model_path=model_path, port=port)
    uvicorn.run(app, host=host, port=port, log_config=None, timeout_graceful_shutdown=10)
