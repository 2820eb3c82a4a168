"""Far Mesh Python SDK: LLM inference on a decentralized Petals swarm, paid in FAR.

    from farlabs import FarMesh

    client = FarMesh(api_key="fl_...")            # or FARLABS_API_KEY / FARLABS_BASE_URL
    for token in client.chat_stream("Write a haiku about GPUs", max_tokens=64):
        print(token, end="", flush=True)
"""

from farlabs._base import DEFAULT_BASE_URL, __version__
from farlabs._client import AsyncChatStream, AsyncFarMesh, ChatStream, FarMesh
from farlabs._errors import (APIConnectionError, APIError, APITimeoutError, AuthenticationError, ConflictError,
                             FarMeshError, GenerationError, InsufficientBalanceError, InvalidRequestError,
                             NotFoundError, RateLimitError, SwarmNotReadyError)
from farlabs._types import (AccountUsage, Balance, ChatResponse, Contribution, FinishReason, InferenceStatus, Message,
                            Model, RequestUsage, TokenEvent, TokenLogprob, TopLogprob, Usage)

__all__ = [
    "__version__", "DEFAULT_BASE_URL",
    "FarMesh", "AsyncFarMesh", "ChatStream", "AsyncChatStream",
    "ChatResponse", "Contribution", "Usage", "Model", "Balance", "AccountUsage", "RequestUsage", "InferenceStatus", "TokenEvent", "TokenLogprob", "TopLogprob",
    "Message", "FinishReason",
    "FarMeshError", "APIError", "APIConnectionError", "APITimeoutError", "AuthenticationError",
    "InsufficientBalanceError", "RateLimitError", "SwarmNotReadyError", "InvalidRequestError", "NotFoundError",
    "ConflictError", "GenerationError",
]
