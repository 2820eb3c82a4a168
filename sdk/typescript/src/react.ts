/**
 * `@farlabs/sdk/react`: the `useFarMesh()` hook. React (18+) is an optional peer dependency: only this entry point
 * imports it, so `@farlabs/sdk` itself works without React.
 */

import { useCallback, useEffect, useMemo, useRef, useState } from "react";

import { type ChatStream, FarMesh, type FarMeshOptions, type PromptOrMessages } from "./client.js";
import { FarMeshError } from "./errors.js";
import type { ChatOptions, ChatResponse, FinishReason, Usage } from "./types.js";

export interface UseFarMeshOptions extends FarMeshOptions {
  /** A client to use instead of one built from the other options (e.g. one shared by several components). */
  client?: FarMesh;
}

/** The state of the last `chat()`. */
export interface FarMeshChatState {
  /** The text streamed so far (the whole text once it ended). */
  text: string;
  /** The streamed tokens so far (they add up to `text`). */
  tokens: string[];
  tokensGenerated: number;
  /** The running cost while the stream goes on; the final cost once it ended. A decimal string in FAR. */
  costFar: string;
  /** True from `chat()` until the stream ends, fails or is cancelled. */
  loading: boolean;
  /** The SDK's typed error (`InsufficientBalanceError`, `RateLimitError`, `APIConnectionError`...); a cancel is not an
   * error. */
  error: FarMeshError | undefined;
  /** True when the last chat was stopped by `cancel()` (or its `signal`, or a newer `chat()`). */
  cancelled: boolean;
  /** Known as soon as `chat()` starts. */
  requestId: string | undefined;
  /** The final result (usage, cost, fee, contributions) once the stream ended normally. */
  response: ChatResponse | undefined;
  usage: Usage | undefined;
  finishReason: FinishReason | undefined;
}

export interface UseFarMesh extends FarMeshChatState {
  /**
   * Stream a generation into the state (a running one is cancelled first). Resolves with the final response, or
   * `undefined` when it failed (see `error`) or was cancelled: it never rejects, so it can be called from an event
   * handler as is.
   */
  chat: (input: PromptOrMessages, options?: ChatOptions) => Promise<ChatResponse | undefined>;
  /** Stop the running chat: drops its HTTP stream (the coordinator then cancels the generation and bills only the
   * tokens generated). `loading` turns false at once; the text so far stays. */
  cancel: () => void;
  /** Cancel any running chat and clear the state. */
  reset: () => void;
  /** The client the hook uses (for `models()`, `balance()`, `usage()`...). */
  client: FarMesh;
}

const IDLE: FarMeshChatState = {
  text: "",
  tokens: [],
  tokensGenerated: 0,
  costFar: "0",
  loading: false,
  error: undefined,
  cancelled: false,
  requestId: undefined,
  response: undefined,
  usage: undefined,
  finishReason: undefined,
};

interface Run {
  stream: ChatStream;
  cancelled: boolean;
}

function asFarMeshError(error: unknown): FarMeshError {
  if (error instanceof FarMeshError) return error;
  return new FarMeshError(error instanceof Error ? error.message : String(error), { cause: error });
}

/**
 * Stream chats from a Far Mesh coordinator into React state.
 *
 * ```tsx
 * const { chat, text, loading, error, cancel, usage, costFar } = useFarMesh({ apiKey, baseUrl });
 * <button onClick={() => chat("Hello", { maxTokens: 64 })} disabled={loading}>Send</button>
 * ```
 */
export function useFarMesh(options: UseFarMeshOptions = {}): UseFarMesh {
  const { client: given, apiKey, baseUrl, timeout, maxRetries, headers, fetch: fetchImpl } = options;
  // Headers by value: an inline object literal is a new object at every render.
  const headersKey = headers ? JSON.stringify(headers) : "";
  const client = useMemo(
    () => given ?? new FarMesh({ apiKey, baseUrl, timeout, maxRetries, headers, fetch: fetchImpl }),
    // eslint-disable-next-line react-hooks/exhaustive-deps
    [given, apiKey, baseUrl, timeout, maxRetries, headersKey, fetchImpl],
  );
  const [state, setState] = useState<FarMeshChatState>(IDLE);
  // The running chat; a run that is no longer current never touches the state again.
  const current = useRef<Run | null>(null);

  const stop = useCallback((): boolean => {
    const run = current.current;
    if (!run) return false;
    current.current = null;
    run.cancelled = true;
    run.stream.abort();
    return true;
  }, []);

  const cancel = useCallback(() => {
    if (stop()) setState((s) => ({ ...s, loading: false, cancelled: true }));
  }, [stop]);

  const reset = useCallback(() => {
    stop();
    setState(IDLE);
  }, [stop]);

  const chat = useCallback(async (input: PromptOrMessages, chatOptions: ChatOptions = {}) => {
    stop();
    let stream: ChatStream;
    try {
      stream = client.chatStream(input, chatOptions);
    } catch (error) { // invalid input
      setState({ ...IDLE, error: asFarMeshError(error) });
      return undefined;
    }
    const run: Run = { stream, cancelled: false };
    current.current = run;
    setState({ ...IDLE, loading: true, requestId: stream.requestId });
    const tokens: string[] = [];
    try {
      for await (const token of stream) {
        if (current.current !== run) break;
        tokens.push(token);
        const snapshot = tokens.slice();
        setState((s) => ({
          ...s,
          text: stream.text,
          tokens: snapshot,
          tokensGenerated: stream.tokensGenerated,
          costFar: stream.costFar,
          requestId: stream.requestId,
        }));
      }
      const response = stream.response;
      if (current.current !== run || !response) return undefined;
      current.current = null;
      setState((s) => ({
        ...s,
        text: response.text,
        tokens: tokens.slice(),
        tokensGenerated: response.usage.completionTokens,
        costFar: response.costFar,
        loading: false,
        requestId: response.requestId || s.requestId,
        response,
        usage: response.usage,
        finishReason: response.finishReason,
      }));
      return response;
    } catch (error) {
      if (run.cancelled) return undefined; // cancel() or a newer chat() took over
      current.current = null;
      if (chatOptions.signal?.aborted) { // the caller's own signal: a cancel too
        setState((s) => ({ ...s, loading: false, cancelled: true }));
      } else {
        setState((s) => ({ ...s, loading: false, error: asFarMeshError(error) }));
      }
      return undefined;
    }
  }, [client, stop]);

  // Leaving the page (unmount) drops a running stream, so the coordinator stops generating.
  useEffect(() => () => {
    stop();
  }, [stop]);

  return { ...state, chat, cancel, reset, client };
}
