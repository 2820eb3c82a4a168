/**
 * The Far Mesh client over `fetch` and web streams (Node 20+ and browsers). SSE is parsed by `eventsource-parser`.
 */

import { EventSourceParserStream } from "eventsource-parser/stream";

import { APIConnectionError, APIError, APITimeoutError, FarMeshError, errorFromResponse } from "./errors.js";
import {
  type AccountUsage,
  type Balance,
  type ChatMessage,
  type ChatOptions,
  type ChatResponse,
  type FinishReason,
  type InferenceStatus,
  type Model,
  type TokenEvent,
  type TokenLogprob,
  toAccountUsage,
  toBalance,
  toChatResponse,
  toInferenceStatus,
  toModel,
  toTokenEvent,
} from "./types.js";

export const VERSION = "0.1.0";
export const DEFAULT_BASE_URL = "http://127.0.0.1:8100";
export const DEFAULT_TIMEOUT_MS = 600_000;
export const DEFAULT_MAX_RETRIES = 2;
const GENERATE_PATH = "/mesh/inference/generate";
const RETRY_STATUSES = new Set([429, 503]);
const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 8_000;
/** Node's error codes of a request that never reached the server (safe to retry). */
const CONNECT_ERROR_CODES = new Set(["ECONNREFUSED", "ENOTFOUND", "EAI_AGAIN", "UND_ERR_CONNECT_TIMEOUT"]);

export interface FarMeshOptions {
  /** API key `fl_…` or a JWT. Default: `FARLABS_API_KEY` (Node). */
  apiKey?: string;
  /** Default: `FARLABS_BASE_URL` (Node), else http://127.0.0.1:8100. */
  baseUrl?: string;
  /** Milliseconds without an answer (or, in a stream, between two events) before an `APITimeoutError`. */
  timeout?: number;
  /** Retries of a request answered 429 or 503 (honouring `Retry-After`); a stream that began is never retried. */
  maxRetries?: number;
  /** Extra headers sent with every request. */
  headers?: Record<string, string>;
  /** A `fetch` implementation (default: the global one). */
  fetch?: typeof fetch;
}

export interface UsageOptions {
  /** Requests per page, 1..500 (default 50). */
  limit?: number;
  /** Only requests created before this time (ISO string, e.g. the previous page's `nextBefore`). */
  before?: string | Date | null;
  /** Days of `daily` sums, 1..366 (default 30). */
  days?: number;
  signal?: AbortSignal;
}

export type PromptOrMessages = string | ChatMessage[];

function env(name: string): string | undefined {
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  const value = (globalThis as any).process?.env?.[name];
  return typeof value === "string" && value ? value : undefined;
}

/** A client-side request ID: the server's idempotency key, known before the first token (so a stream can be
 * cancelled at once, and a retried request never runs twice). */
export function newRequestId(): string {
  const uuid = globalThis.crypto?.randomUUID?.();
  if (uuid) return `req_${uuid.replace(/-/g, "")}`;
  let hex = "";
  for (let i = 0; i < 32; i++) hex += Math.floor(Math.random() * 16).toString(16);
  return `req_${hex}`;
}

const OPTION_FIELDS: Record<string, string> = {
  maxTokens: "max_tokens",
  temperature: "temperature",
  topP: "top_p",
  topK: "top_k",
  repetitionPenalty: "repetition_penalty",
  presencePenalty: "presence_penalty",
  frequencyPenalty: "frequency_penalty",
  logitBias: "logit_bias",
  logprobs: "logprobs",
  stop: "stop",
  seed: "seed",
  model: "model_id",
  requestId: "request_id",
  userWallet: "user_wallet",
};

/** The JSON body of `POST /mesh/inference/generate`. */
export function buildBody(input: PromptOrMessages, options: ChatOptions, stream: boolean): Record<string, unknown> {
  const body: Record<string, unknown> = {};
  if (typeof input === "string") body.prompt = input;
  else if (Array.isArray(input)) body.messages = input.map((m) => ({ role: m.role, content: m.content }));
  else throw new TypeError("input must be a prompt string or an array of {role, content} messages");
  for (const [option, field] of Object.entries(OPTION_FIELDS)) {
    const value = (options as Record<string, unknown>)[option];
    if (value !== undefined && value !== null) body[field] = option === "stop" && typeof value === "string" ? [value] : value;
  }
  body.request_id ??= newRequestId();
  body.stream = stream;
  return body;
}

/** Milliseconds before retry number `attempt + 1`: the server's `Retry-After`, else backoff with jitter. */
export function retryDelayMs(attempt: number, error?: APIError): number {
  const retryAfter = (error as { retryAfter?: number } | undefined)?.retryAfter;
  if (retryAfter !== undefined) return retryAfter * 1000;
  return Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** attempt) * (1 + Math.random() * 0.25);
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** One attempt's abort controller: linked to the caller's signals, with an idle timeout that `touch()` re-arms. */
class RequestControl {
  readonly controller = new AbortController();
  timedOut = false;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private readonly unlinks: Array<() => void> = [];

  constructor(private readonly timeoutMs: number, private readonly signals: Array<AbortSignal | undefined>) {
    for (const signal of signals) {
      if (!signal) continue;
      if (signal.aborted) {
        this.controller.abort(signal.reason);
        continue;
      }
      const onAbort = () => this.controller.abort(signal.reason);
      signal.addEventListener("abort", onAbort, { once: true });
      this.unlinks.push(() => signal.removeEventListener("abort", onAbort));
    }
    this.touch();
  }

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  touch(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    if (this.timeoutMs > 0 && Number.isFinite(this.timeoutMs)) {
      this.timer = setTimeout(() => {
        this.timedOut = true;
        this.controller.abort(new APITimeoutError(`no answer from the coordinator within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
    }
  }

  dispose(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    for (const unlink of this.unlinks.splice(0)) unlink();
  }

  /** The error to throw for a failure of fetch or of the body stream. */
  mapError(error: unknown): unknown {
    if (this.timedOut) return new APITimeoutError(`no answer from the coordinator within ${this.timeoutMs} ms`);
    const aborted = this.signals.find((s) => s?.aborted);
    if (aborted) return aborted.reason; // the caller aborted: rethrow their reason, as fetch does
    if (error instanceof FarMeshError) return error;
    let message = error instanceof Error ? error.message : String(error);
    const code = (error as { cause?: { code?: string } } | undefined)?.cause?.code;
    if (code) message += ` (${code})`;
    return new APIConnectionError(`connection to the coordinator failed: ${message}`, { cause: error });
  }
}

function isConnectFailure(error: unknown): boolean {
  const cause = (error as { cause?: { code?: string } } | undefined)?.cause;
  return error instanceof APIConnectionError && !(error instanceof APITimeoutError) &&
    CONNECT_ERROR_CODES.has(String((cause as { cause?: { code?: string } })?.cause?.code ?? cause?.code ?? ""));
}

function headersObject(headers: Headers): Record<string, string> {
  const out: Record<string, string> = {};
  headers.forEach((value, key) => {
    out[key.toLowerCase()] = value;
  });
  return out;
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

interface Opened {
  response: Response;
  control: RequestControl;
}

/**
 * Client of a Far Mesh coordinator.
 *
 * ```ts
 * const mesh = new FarMesh({ apiKey: "fl_…", baseUrl: "http://127.0.0.1:8100" });
 * for await (const token of mesh.chatStream("Hello", { maxTokens: 32 })) process.stdout.write(token);
 * ```
 */
export class FarMesh {
  readonly apiKey: string | undefined;
  readonly baseUrl: string;
  readonly timeout: number;
  readonly maxRetries: number;
  private readonly headers: Record<string, string>;
  private readonly fetchImpl: typeof fetch;

  constructor(options: FarMeshOptions = {}) {
    this.apiKey = options.apiKey ?? env("FARLABS_API_KEY");
    this.baseUrl = (options.baseUrl ?? env("FARLABS_BASE_URL") ?? DEFAULT_BASE_URL).replace(/\/+$/, "");
    this.timeout = options.timeout ?? DEFAULT_TIMEOUT_MS;
    this.maxRetries = options.maxRetries ?? DEFAULT_MAX_RETRIES;
    if (!(this.maxRetries >= 0)) throw new RangeError("maxRetries must be >= 0");
    const fetchImpl = options.fetch ?? globalThis.fetch;
    if (!fetchImpl) throw new FarMeshError("no fetch implementation: pass options.fetch");
    this.fetchImpl = fetchImpl.bind(globalThis);
    this.headers = { Accept: "application/json", ...(options.headers ?? {}) };
    if (this.apiKey) this.headers.Authorization = `Bearer ${this.apiKey}`;
  }

  /** Generate and wait for the whole text. `input` is a prompt or a list of chat messages. */
  async chat(input: PromptOrMessages, options: ChatOptions = {}): Promise<ChatResponse> {
    const body = buildBody(input, options, false);
    return toChatResponse((await this.json("POST", GENERATE_PATH, body, options.signal)) as Record<string, unknown>);
  }

  /**
   * A streamed generation: `for await (const token of mesh.chatStream(...))`. The request is sent when the
   * iteration starts (errors before the first token are thrown there); the final usage, cost and contributions
   * are on `stream.response` when it ends. Abort with `options.signal` or `stream.abort()`; `stream.cancel()` asks
   * the coordinator to stop and lets the stream end normally with finishReason "cancelled".
   */
  chatStream(input: PromptOrMessages, options: ChatOptions = {}): ChatStream {
    return new ChatStream(this, buildBody(input, options, true), options.signal);
  }

  /** Cancel a running request: "cancelling", or its final status if it already ended. */
  async cancel(requestId: string, options: { signal?: AbortSignal } = {}): Promise<string> {
    const data = (await this.json("DELETE", `/mesh/inference/${encodeURIComponent(requestId)}`, undefined,
      options.signal)) as Record<string, unknown>;
    return String(data.status);
  }

  async status(requestId: string, options: { signal?: AbortSignal } = {}): Promise<InferenceStatus> {
    return toInferenceStatus((await this.json("GET", `/mesh/inference/${encodeURIComponent(requestId)}`, undefined,
      options.signal)) as Record<string, unknown>);
  }

  async models(options: { signal?: AbortSignal } = {}): Promise<Model[]> {
    const data = (await this.json("GET", "/v1/models", undefined, options.signal)) as { data?: unknown[] };
    return (data.data ?? []).map((m) => toModel(m as Record<string, unknown>));
  }

  /** The account's balance, reserved and available FAR, and how to deposit (`GET /mesh/account`). */
  async balance(options: { signal?: AbortSignal } = {}): Promise<Balance> {
    return toBalance((await this.json("GET", "/mesh/account", undefined, options.signal)) as Record<string, unknown>);
  }

  /** Recent requests with tokens, cost and nodes, daily sums and totals (`GET /mesh/account/usage`). `limit`
   * 1..500 (50), `days` of daily sums 1..366 (30), `before` (a previous page's `nextBefore`) pages back. */
  async usage(options: UsageOptions = {}): Promise<AccountUsage> {
    const query = new URLSearchParams({ limit: String(options.limit ?? 50), days: String(options.days ?? 30) });
    if (options.before !== undefined && options.before !== null) {
      query.set("before", options.before instanceof Date ? options.before.toISOString() : options.before);
    }
    return toAccountUsage((await this.json("GET", `/mesh/account/usage?${query}`, undefined,
      options.signal)) as Record<string, unknown>);
  }

  private async json(method: string, path: string, body: unknown, signal?: AbortSignal): Promise<unknown> {
    const { response, control } = await this._open(method, path, body, [signal], false);
    try {
      const text = await response.text();
      const data = parseJson(text);
      if (typeof data !== "object" || data === null) {
        throw new APIError(`the coordinator answered non-JSON: ${text.slice(0, 200)}`, {
          status: response.status,
          code: "invalid_response",
        });
      }
      return data;
    } catch (error) {
      throw control.mapError(error);
    } finally {
      control.dispose();
    }
  }

  /** @internal Send with retries (429/503 and connection failures); returns a 2xx response. */
  async _open(method: string, path: string, body: unknown, signals: Array<AbortSignal | undefined>,
    stream: boolean): Promise<Opened> {
    const headers: Record<string, string> = { ...this.headers };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (stream) {
      headers.Accept = "text/event-stream";
      headers["Cache-Control"] = "no-store";
    }
    const requestId = (body as { request_id?: string } | undefined)?.request_id;
    const callerSignal = signals.find((s) => s !== undefined);
    for (let attempt = 0; ; attempt++) {
      const control = new RequestControl(this.timeout, signals);
      let response: Response;
      try {
        response = await this.fetchImpl(this.baseUrl + path, {
          method,
          headers,
          body: body === undefined ? undefined : JSON.stringify(body),
          signal: control.signal,
        });
      } catch (error) {
        control.dispose();
        const mapped = control.mapError(error);
        if (isConnectFailure(mapped) && attempt < this.maxRetries) {
          await sleep(retryDelayMs(attempt), callerSignal);
          continue;
        }
        throw mapped;
      }
      if (response.ok) return { response, control };
      let text = "";
      try {
        text = await response.text();
      } catch (error) {
        throw control.mapError(error);
      } finally {
        control.dispose();
      }
      const error = errorFromResponse(response.status, parseJson(text), headersObject(response.headers), requestId);
      if (RETRY_STATUSES.has(response.status) && attempt < this.maxRetries) {
        await sleep(retryDelayMs(attempt, error), callerSignal);
        continue;
      }
      throw error;
    }
  }
}

/**
 * An async iterator of tokens (non-empty strings). While it runs, `text`, `tokensGenerated` and `costFar` follow
 * it; when it ends, `response` holds the final `ChatResponse`.
 */
export class ChatStream implements AsyncIterable<string> {
  /** Known before the first token (the SDK sends one): pass it to `FarMesh.cancel()` from anywhere. */
  requestId: string;
  /** The text streamed so far. */
  text = "";
  tokensGenerated = 0;
  /** The running cost while the stream goes on; the final cost once it ended. */
  costFar = "0";
  /** The final result once the stream ended. */
  response: ChatResponse | undefined;
  /** The last token event received. */
  lastEvent: TokenEvent | undefined;
  /** The log-probabilities of the tokens so far (when the request set `logprobs`). */
  logprobs: TokenLogprob[] = [];
  private readonly local = new AbortController();
  private iterator: AsyncGenerator<string> | undefined;

  constructor(private readonly client: FarMesh, private readonly body: Record<string, unknown>,
    private readonly signal?: AbortSignal) {
    this.requestId = String(body.request_id);
  }

  get finishReason(): FinishReason | undefined {
    return this.response?.finishReason;
  }

  [Symbol.asyncIterator](): AsyncGenerator<string> {
    this.iterator ??= this.tokens();
    return this.iterator;
  }

  /** Consume what is left of the stream and return the final result. */
  async finalResponse(): Promise<ChatResponse> {
    for await (const _ of this); // eslint-disable-line @typescript-eslint/no-unused-vars
    if (!this.response) throw new APIConnectionError(`the stream of request ${this.requestId} has no final event`);
    return this.response;
  }

  /** Ask the coordinator to stop (within one token step); the stream then ends with finishReason "cancelled". */
  cancel(): Promise<string> {
    return this.client.cancel(this.requestId);
  }

  /** Drop the connection (the coordinator cancels the generation); the iteration throws `reason`. */
  abort(reason?: unknown): void {
    this.local.abort(reason ?? new DOMException("The stream was aborted", "AbortError"));
  }

  private async *tokens(): AsyncGenerator<string> {
    const { response, control } = await this.client._open("POST", GENERATE_PATH, this.body,
      [this.signal, this.local.signal], true);
    if (!response.body) {
      control.dispose();
      throw new APIConnectionError("the coordinator answered a stream without a body");
    }
    const reader = response.body
      .pipeThrough(new TextDecoderStream())
      .pipeThrough(new EventSourceParserStream())
      .getReader();
    try {
      for (;;) {
        let next: ReadableStreamReadResult<{ event?: string; data: string }>;
        try {
          next = await reader.read();
        } catch (error) {
          throw control.mapError(error);
        }
        if (next.done) break;
        control.touch();
        yield* this.feed(next.value.event ?? "message", next.value.data);
        if (this.response) break;
      }
      if (!this.response) {
        throw new APIConnectionError(
          `the stream of request ${this.requestId} ended before its final event (after ${this.tokensGenerated} tokens)`);
      }
    } finally {
      control.dispose();
      if (!this.response) control.controller.abort(); // the consumer left early: drop the connection
      reader.cancel().catch(() => undefined);
    }
  }

  private feed(event: string, data: string): string[] {
    if (event !== "message" && event !== "error") return [];
    let payload: Record<string, unknown>;
    try {
      payload = data ? JSON.parse(data) : {};
    } catch {
      throw new APIConnectionError(`malformed event from the coordinator: ${data.slice(0, 200)}`);
    }
    if (event === "error" || ("error" in payload && !("done" in payload))) {
      throw errorFromResponse(undefined, payload, {}, this.requestId);
    }
    if (payload.done) {
      this.response = toChatResponse(payload);
      if (!this.response.logprobs && this.logprobs.length) this.response.logprobs = [...this.logprobs];
      this.requestId = this.response.requestId || this.requestId;
      this.costFar = this.response.costFar;
      this.tokensGenerated = this.response.usage.completionTokens;
      const finalText = this.response.text;
      // A replayed request (same requestId, already finished) sends only the final event: hand its text on so
      // the streamed tokens always add up to the final text.
      if (finalText.length > this.text.length && finalText.startsWith(this.text)) {
        const rest = finalText.slice(this.text.length);
        this.text = finalText;
        return [rest];
      }
      return [];
    }
    const token = toTokenEvent(payload);
    this.lastEvent = token;
    if (token.logprobs) this.logprobs.push(token.logprobs);
    this.requestId = token.requestId || this.requestId;
    this.tokensGenerated = token.tokensGenerated;
    this.costFar = token.costFar;
    if (!token.token) return [];
    this.text += token.token;
    return [token.token];
  }
}
