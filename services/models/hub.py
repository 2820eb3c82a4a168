"""Hugging Face hub downloads: one clear line when the hub cannot be reached (instead of a traceback)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from services.models.catalog import ModelUnavailable


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _is_hub_failure(error: BaseException) -> bool:
    import requests
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    if isinstance(error, (requests.ConnectionError, requests.Timeout, LocalEntryNotFoundError, HfHubHTTPError)):
        return True
    text = str(error)
    # transformers wraps hub failures into OSError with these phrases (4.34)
    return isinstance(error, OSError) and any(phrase in text for phrase in (
        "couldn't connect to", "is not a local folder and is not a valid model identifier",
        "offline mode", "HF_HUB_OFFLINE", "does not appear to have a file named"))


@contextlib.contextmanager
def hub_errors_explained(model: str):
    """Turn a failed download of hub model ``model`` into ``ModelUnavailable`` with one line saying why."""
    try:
        yield
    except Exception as error:
        if Path(model).expanduser().is_dir() or not _is_hub_failure(error):
            raise
        if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True", "ON", "YES"):
            why = "HF_HUB_OFFLINE=1 is set and it is not in the local cache"
        else:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            why = f"the hub at {hub_endpoint()} could not be reached or refused it ({first[:200]})"
        raise ModelUnavailable(f"cannot download model {model!r}: {why}. Check the network (or HF_ENDPOINT), "
                               "the model name, HF_TOKEN for gated models, or pass a local model directory "
                               "with --model / FAR_MESH_MODEL_PATH") from None


def prepare_model(model_id: str, explicit_path=None, *, log=None) -> str:
    """Resolve ``model_id`` to what transformers/Petals load (building a catalog model if needed) and, for a
    hub model, fetch its config now, so a wrong name or an unreachable hub fails at start with one line."""
    from services.models.catalog import resolve_model

    kwargs = {"log": log} if log is not None else {}
    source = resolve_model(model_id, explicit_path, **kwargs)
    if not Path(source).is_dir():
        from transformers import AutoConfig

        with hub_errors_explained(source):
            AutoConfig.from_pretrained(source)
    return source
