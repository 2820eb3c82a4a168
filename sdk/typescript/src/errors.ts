/** Typed errors. Every error the coordinator answers is an `APIError` (or one of its subclasses). */

/** Base class of every error thrown by the SDK (aborts throw the signal's reason, as `fetch` does). */
export class FarMeshError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The coordinator could not be reached, or the connection broke (including a stream cut before its end). */
export class APIConnectionError extends FarMeshError {}

/** No answer within `timeout`. */
export class APITimeoutError extends APIConnectionError {}

export interface APIErrorInit {
  status?: number;
  code: string;
  body?: Record<string, unknown>;
  requestId?: string;
  headers?: Record<string, string>;
}

/**
 * An error answered by the coordinator: `{"error": {"code", "message", ...}}`. `status` is the HTTP status, or
 * `undefined` for an error reported inside a stream that had already begun (an SSE `event: error`). `body` is
 * the `error` object with every extra field the server sent.
 */
export class APIError extends FarMeshError {
  readonly status: number | undefined;
  readonly code: string;
  readonly body: Record<string, unknown>;
  readonly requestId: string | undefined;
  readonly headers: Record<string, string>;

  constructor(message: string, init: APIErrorInit) {
    super(message);
    this.status = init.status;
    this.code = init.code;
    this.body = init.body ?? {};
    this.requestId = init.requestId;
    this.headers = init.headers ?? {};
  }
}

/** 401: missing, unknown or revoked API key, or an invalid/expired JWT. */
export class AuthenticationError extends APIError {}

/** 402: the prepaid balance cannot cover this request's worst case (`maxTokens` × price). */
export class InsufficientBalanceError extends APIError {
  get requiredFar(): string | undefined {
    return this.body.required_far as string | undefined;
  }
  get availableFar(): string | undefined {
    return this.body.available_far as string | undefined;
  }
}

/** 429: more requests per minute than the key allows. `retryAfter` is in seconds. */
export class RateLimitError extends APIError {
  readonly retryAfter: number | undefined;
  constructor(message: string, init: APIErrorInit & { retryAfter?: number }) {
    super(message, init);
    this.retryAfter = init.retryAfter;
  }
}

/** 503: some blocks of the model have no online server. `missingBlocks` lists them. */
export class SwarmNotReadyError extends APIError {
  readonly retryAfter: number | undefined;
  constructor(message: string, init: APIErrorInit & { retryAfter?: number }) {
    super(message, init);
    this.retryAfter = init.retryAfter;
  }
  get missingBlocks(): number[] {
    return (this.body.missing_blocks as number[] | undefined) ?? [];
  }
  get loadingBlocks(): number[] {
    return (this.body.loading_blocks as number[] | undefined) ?? [];
  }
}

/** 400/422: invalid request (empty prompt, maxTokens out of range, prompt longer than the context, ...). */
export class InvalidRequestError extends APIError {}

/** 404: unknown model or request. */
export class NotFoundError extends APIError {}

/** 409: the `requestId` (idempotency key) is in use or still running. */
export class ConflictError extends APIError {}

/** 502/504, or an error event inside a stream: the swarm failed while generating. */
export class GenerationError extends APIError {}

function retryAfterOf(headers: Record<string, string>, error: Record<string, unknown>): number | undefined {
  const raw = headers["retry-after"] ?? error.retry_after_s;
  if (raw === undefined || raw === null) return undefined;
  const seconds = Number(raw);
  return Number.isFinite(seconds) ? Math.max(0, seconds) : undefined;
}

/** The typed error for an HTTP status and its JSON body (or an in-band stream error when `status` is undefined). */
export function errorFromResponse(
  status: number | undefined,
  payload: unknown,
  headers: Record<string, string> = {},
  requestId?: string,
): APIError {
  let error: Record<string, unknown> = {};
  if (payload && typeof payload === "object" && "error" in payload) {
    const inner = (payload as { error: unknown }).error;
    if (inner && typeof inner === "object") error = inner as Record<string, unknown>;
  }
  const code = String(error.code ?? (status ? `http_${status}` : "stream_error"));
  const message = String(
    error.message ?? (typeof payload === "string" && payload ? payload : `the coordinator answered ${status}`),
  );
  const init: APIErrorInit = { status, code, body: error, requestId, headers };
  if (status === 401 || code === "invalid_credentials") return new AuthenticationError(message, init);
  if (status === 402 || code === "insufficient_balance") return new InsufficientBalanceError(message, init);
  if (status === 429 || code === "rate_limited") {
    return new RateLimitError(message, { ...init, retryAfter: retryAfterOf(headers, error) });
  }
  if (status === 503 || code === "swarm_not_ready") {
    return new SwarmNotReadyError(message, { ...init, retryAfter: retryAfterOf(headers, error) });
  }
  if (status === 400 || status === 422) return new InvalidRequestError(message, init);
  if (status === 404) return new NotFoundError(message, init);
  if (status === 409) return new ConflictError(message, init);
  if (status === undefined || status === 502 || status === 504) return new GenerationError(message, init);
  return new APIError(message, init);
}
