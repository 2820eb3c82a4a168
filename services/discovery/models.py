"""Which models discovery knows, and how many transformer blocks each has."""

from __future__ import annotations

import json
import re
from pathlib import Path

from services.common.config import DiscoverySettings


class ModelConfigError(ValueError):
    pass


def num_blocks_of(model_path: str | Path) -> int:
    config = Path(model_path) / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as error:
        raise ModelConfigError(f"FAR_MESH_MODEL_PATH: cannot read {config}: {error}") from None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(data.get(key), int) and data[key] > 0:
            return data[key]
    raise ModelConfigError(f"FAR_MESH_MODEL_PATH: {config} has no num_hidden_layers")


def parse_models_setting(text: str) -> dict[str, int]:
    """``"org/a=32,org/b=80"`` -> {"org/a": 32, "org/b": 80}."""
    models: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        match = re.fullmatch(r"(.+?)\s*=\s*(\d+)", item)
        if not match or int(match.group(2)) <= 0:
            raise ModelConfigError(f"DISCOVERY_MODELS: {item!r} is not MODEL_ID=NUM_BLOCKS (e.g. org/model=32)")
        models[match.group(1)] = int(match.group(2))
    return models


def known_models(settings: DiscoverySettings) -> dict[str, int]:
    """DEFAULT_MODEL_ID (block count from FAR_MESH_MODEL_PATH/config.json, else from the model catalog) plus
    DISCOVERY_MODELS (which also names hub models: discovery never downloads a model)."""
    from services.models.catalog import find_catalog_model

    models: dict[str, int] = {}
    catalog_model = find_catalog_model(settings.DEFAULT_MODEL_ID)
    if settings.FAR_MESH_MODEL_PATH:
        models[settings.DEFAULT_MODEL_ID] = num_blocks_of(settings.FAR_MESH_MODEL_PATH)
    elif catalog_model is not None:
        models[catalog_model.model_id] = catalog_model.num_blocks
    models.update(parse_models_setting(settings.DISCOVERY_MODELS))
    return models
