export {
  ChatStream,
  DEFAULT_BASE_URL,
  DEFAULT_MAX_RETRIES,
  DEFAULT_TIMEOUT_MS,
  FarMesh,
  VERSION,
  buildBody,
  newRequestId,
  retryDelayMs,
} from "./client.js";
export type { FarMeshOptions, PromptOrMessages } from "./client.js";
export {
  APIConnectionError,
  APIError,
  APITimeoutError,
  AuthenticationError,
  ConflictError,
  FarMeshError,
  GenerationError,
  InsufficientBalanceError,
  InvalidRequestError,
  NotFoundError,
  RateLimitError,
  SwarmNotReadyError,
  errorFromResponse,
} from "./errors.js";
export type { APIErrorInit } from "./errors.js";
export type {
  ChatMessage,
  ChatOptions,
  ChatResponse,
  Contribution,
  FinishReason,
  InferenceStatus,
  Model,
  Role,
  TokenEvent,
  Usage,
} from "./types.js";
