/** Request and response types. Money is a decimal string in FAR, exactly as the coordinator sends it. */

export type Role = "system" | "user" | "assistant";

/** One chat turn; the coordinator renders the turns with the model's chat template. */
export interface ChatMessage {
  role: Role;
  content: string;
}

export type FinishReason = "length" | "stop" | "eos" | "cancelled";

export interface ChatOptions {
  /** 1..4096 (the coordinator's default is 100); prompt + maxTokens must fit the model's context. */
  maxTokens?: number;
  /** 0..2; 0 is greedy decoding. */
  temperature?: number;
  topP?: number;
  /** 0 turns top-k off. */
  topK?: number;
  /** Up to 8 stop sequences (never emitted). */
  stop?: string | string[];
  /** Same seed, same text. */
  seed?: number;
  /** Model ID (the coordinator's default model when omitted). */
  model?: string;
  /** Idempotency key; the SDK generates one when omitted (so a retry can never run twice). */
  requestId?: string;
  userWallet?: string;
  /** Aborting drops the connection; the coordinator cancels the generation. */
  signal?: AbortSignal;
}

export interface Usage {
  promptTokens: number;
  completionTokens: number;
  totalTokens: number;
}

/** What one provider node computed for the request, and what it earns for it. */
export interface Contribution {
  nodeId: string | null;
  peerId: string;
  walletAddress: string | null;
  blocks: string;
  workUnits: number;
  paymentFar: string;
}

export interface ChatResponse {
  text: string;
  requestId: string;
  finishReason: FinishReason;
  usage: Usage;
  costFar: string;
  feeFar: string;
  contributions: Contribution[];
}

/** One streamed step: `token` may be "" while text is held back (a possible stop sequence). */
export interface TokenEvent {
  token: string;
  requestId: string;
  tokensGenerated: number;
  costFar: string;
}

export interface Model {
  id: string;
  ownedBy: string;
  ready: boolean;
  missingBlocks: number[];
  loadingBlocks: number[];
  contextLength: number | null;
}

/** `status` is running, completed, cancelled, failed or interrupted. */
export interface InferenceStatus {
  requestId: string;
  status: string;
  tokensGenerated: number;
  finishReason: string | null;
  costFar: string | null;
  route: unknown[];
}

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

export function toChatResponse(data: Json): ChatResponse {
  const usage = (data.usage ?? {}) as Json;
  const promptTokens = Number(usage.prompt_tokens ?? 0);
  const completionTokens = Number(usage.completion_tokens ?? 0);
  return {
    text: String(data.text ?? ""),
    requestId: String(data.request_id ?? ""),
    finishReason: (data.finish_reason ?? "stop") as FinishReason,
    usage: { promptTokens, completionTokens, totalTokens: promptTokens + completionTokens },
    costFar: String(data.cost_far ?? "0"),
    feeFar: String(data.fee_far ?? "0"),
    contributions: ((data.contributions ?? []) as Json[]).map((c) => ({
      nodeId: c.node_id ?? null,
      peerId: String(c.peer_id ?? ""),
      walletAddress: c.wallet_address ?? null,
      blocks: String(c.blocks ?? ""),
      workUnits: Number(c.work_units ?? 0),
      paymentFar: String(c.payment_far ?? "0"),
    })),
  };
}

export function toTokenEvent(data: Json): TokenEvent {
  return {
    token: String(data.token ?? ""),
    requestId: String(data.request_id ?? ""),
    tokensGenerated: Number(data.tokens_generated ?? 0),
    costFar: String(data.cost_far ?? "0"),
  };
}

export function toModel(data: Json): Model {
  return {
    id: String(data.id ?? ""),
    ownedBy: String(data.owned_by ?? ""),
    ready: Boolean(data.ready),
    missingBlocks: (data.missing_blocks ?? []) as number[],
    loadingBlocks: (data.loading_blocks ?? []) as number[],
    contextLength: (data.context_length ?? null) as number | null,
  };
}

export function toInferenceStatus(data: Json): InferenceStatus {
  return {
    requestId: String(data.request_id ?? ""),
    status: String(data.status ?? ""),
    tokensGenerated: Number(data.tokens_generated ?? 0),
    finishReason: (data.finish_reason ?? null) as string | null,
    costFar: data.cost_far === undefined || data.cost_far === null ? null : String(data.cost_far),
    route: (data.route ?? []) as unknown[],
  };
}
