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
  /** 0..2; 0 is greedy decoding. Omitted (as topP, topK, repetitionPenalty): the model's recommended value. */
  temperature?: number;
  topP?: number;
  /** 0 turns top-k off. */
  topK?: number;
  /** > 0; 1 is off: logits of tokens already in the prompt or output are divided (positive) or multiplied by it. */
  repetitionPenalty?: number;
  /** -2..2 (OpenAI's): subtracted once from the logit of a token already generated. */
  presencePenalty?: number;
  /** -2..2 (OpenAI's): subtracted per occurrence of a token already generated. */
  frequencyPenalty?: number;
  /** {token id: -100..100} added to that token's logit (-100 bans it). */
  logitBias?: Record<number | string, number>;
  /** 0..20: each token's log-probability and this many most likely tokens (ChatResponse.logprobs). */
  logprobs?: number;
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

/** A token (its own text and UTF-8 bytes) and its log-probability. */
export interface TopLogprob {
  token: string;
  logprob: number;
  bytes: number[];
}

/** A generated token's log-probability and the most likely tokens at its step. */
export interface TokenLogprob extends TopLogprob {
  topLogprobs: TopLogprob[];
}

export interface ChatResponse {
  text: string;
  requestId: string;
  finishReason: FinishReason;
  usage: Usage;
  costFar: string;
  feeFar: string;
  contributions: Contribution[];
  /** One per generated token when the request set `logprobs`. */
  logprobs?: TokenLogprob[];
}

/** One streamed step: `token` may be "" while text is held back (a possible stop sequence). */
export interface TokenEvent {
  token: string;
  requestId: string;
  tokensGenerated: number;
  costFar: string;
  /** When the request set `logprobs`. */
  logprobs?: TokenLogprob;
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
    contributions: ((data.contributions ?? []) as Json[]).map(toContribution),
    ...(Array.isArray(data.logprobs) ? { logprobs: (data.logprobs as Json[]).map(toTokenLogprob) } : {}),
  };
}

function toTopLogprob(data: Json): TopLogprob {
  return { token: String(data.token ?? ""), logprob: Number(data.logprob ?? 0), bytes: (data.bytes ?? []) as number[] };
}

export function toTokenLogprob(data: Json): TokenLogprob {
  return { ...toTopLogprob(data), topLogprobs: ((data.top_logprobs ?? []) as Json[]).map(toTopLogprob) };
}

export function toTokenEvent(data: Json): TokenEvent {
  return {
    token: String(data.token ?? ""),
    requestId: String(data.request_id ?? ""),
    tokensGenerated: Number(data.tokens_generated ?? 0),
    costFar: String(data.cost_far ?? "0"),
    ...(data.logprobs ? { logprobs: toTokenLogprob(data.logprobs as Json) } : {}),
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

/** How to top up (`GET /mesh/account`'s `deposit`; docs/accounts.md): call `deposit(accountRef, amount)` on the
 * FarDeposit `contract` after approving it on the FAR `token`. */
export interface DepositInfo {
  network: string;
  chainId: number;
  contract: string;
  token: string;
  accountRef: string;
  confirmations: number;
  how: string;
}

/** `GET /mesh/account`. `balanceFar` includes `reservedFar` (held for running requests); `availableFar` is what a
 * new request can reserve. `deposit` is null when the coordinator has no deposit contract. */
export interface Balance {
  accountId: string;
  name: string;
  balanceFar: string;
  reservedFar: string;
  availableFar: string;
  depositedFar: string;
  grantedFar: string;
  chargedFar: string;
  deposit: DepositInfo | null;
}

/** One request of `GET /mesh/account/usage`: tokens, cost (null while running) and the nodes that served it. */
export interface RequestUsage {
  requestId: string;
  modelId: string;
  status: string;
  finishReason: string | null;
  promptTokens: number;
  completionTokens: number;
  costFar: string | null;
  reservedFar: string | null;
  createdAt: string;
  finalizedAt: string | null;
  nodes: Contribution[];
}

/** Sums of a UTC day (`day` is YYYY-MM-DD), or of every request (`totals`, without `day`). */
export interface UsageTotals {
  requests: number;
  promptTokens: number;
  completionTokens: number;
  costFar: string;
}

export interface DailyUsage extends UsageTotals {
  day: string;
}

/** `GET /mesh/account/usage`: recent `requests` (newest first; pass `nextBefore` as `before` for the next page,
 * null on the last one), `daily` sums of the last `days`, and `totals` over the account's whole history. */
export interface AccountUsage {
  requests: RequestUsage[];
  nextBefore: string | null;
  daily: DailyUsage[];
  totals: UsageTotals;
}

const far = (value: unknown): string => (value === undefined || value === null ? "0" : String(value));
const farOrNull = (value: unknown): string | null => (value === undefined || value === null ? null : String(value));

function toContribution(c: Json): Contribution {
  return {
    nodeId: c.node_id ?? null,
    peerId: String(c.peer_id ?? ""),
    walletAddress: c.wallet_address ?? null,
    blocks: String(c.blocks ?? ""),
    workUnits: Number(c.work_units ?? 0),
    paymentFar: far(c.payment_far),
  };
}

function toTotals(data: Json): UsageTotals {
  return {
    requests: Number(data.requests ?? 0),
    promptTokens: Number(data.prompt_tokens ?? 0),
    completionTokens: Number(data.completion_tokens ?? 0),
    costFar: far(data.cost_far),
  };
}

export function toBalance(data: Json): Balance {
  const d = data.deposit as Json | null | undefined;
  return {
    accountId: String(data.account_id ?? ""),
    name: String(data.name ?? ""),
    balanceFar: far(data.balance_far),
    reservedFar: far(data.reserved_far),
    availableFar: far(data.available_far),
    depositedFar: far(data.deposited_far),
    grantedFar: far(data.granted_far),
    chargedFar: far(data.charged_far),
    deposit: d
      ? {
        network: String(d.network ?? ""),
        chainId: Number(d.chain_id ?? 0),
        contract: String(d.contract ?? ""),
        token: String(d.token ?? ""),
        accountRef: String(d.account_ref ?? ""),
        confirmations: Number(d.confirmations ?? 0),
        how: String(d.how ?? ""),
      }
      : null,
  };
}

export function toAccountUsage(data: Json): AccountUsage {
  return {
    requests: ((data.requests ?? []) as Json[]).map((r) => ({
      requestId: String(r.request_id ?? ""),
      modelId: String(r.model_id ?? ""),
      status: String(r.status ?? ""),
      finishReason: (r.finish_reason ?? null) as string | null,
      promptTokens: Number(r.prompt_tokens ?? 0),
      completionTokens: Number(r.completion_tokens ?? 0),
      costFar: farOrNull(r.cost_far),
      reservedFar: farOrNull(r.reserved_far),
      createdAt: String(r.created_at ?? ""),
      finalizedAt: (r.finalized_at ?? null) as string | null,
      nodes: ((r.nodes ?? []) as Json[]).map(toContribution),
    })),
    nextBefore: (data.next_before ?? null) as string | null,
    daily: ((data.daily ?? []) as Json[]).map((d) => ({ day: String(d.day ?? ""), ...toTotals(d) })),
    totals: toTotals((data.totals ?? {}) as Json),
  };
}
