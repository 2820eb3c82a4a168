// Offline tests of the compiled SDK (dist/) against a tiny local Node HTTP server started here on 127.0.0.1.
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { after, before, describe, test } from "node:test";

import {
  APIConnectionError,
  APITimeoutError,
  AuthenticationError,
  ConflictError,
  FarMesh,
  GenerationError,
  InsufficientBalanceError,
  InvalidRequestError,
  NotFoundError,
  RateLimitError,
  SwarmNotReadyError,
  buildBody,
} from "../dist/index.js";

const DONE = {
  done: true, request_id: "r1", finish_reason: "length", text: "Hello world",
  usage: { prompt_tokens: 3, completion_tokens: 2 }, cost_far: "0.0002", fee_far: "0.00002",
  contributions: [{ node_id: "n1", peer_id: "Qm1", wallet_address: "0x" + "a".repeat(40), blocks: "0:4",
    work_units: 8, payment_far: "0.00018" }],
};
const token = (text, n) => ({ token: text, request_id: "r1", tokens_generated: n, cost_far: `0.000${n}` });
const sse = (data, event) => (event ? `event: ${event}\n` : "") + `data: ${JSON.stringify(data)}\n\n`;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// route name (first path segment after /t/) -> handler(req, res, body, count)
const routes = new Map();
const requests = [];
let server;
let base;

function route(name, handler) {
  routes.set(name, { handler, count: 0 });
  return `${base}/t/${name}`;
}

before(async () => {
  server = createServer((req, res) => {
    let raw = "";
    req.on("data", (chunk) => (raw += chunk));
    req.on("end", () => {
      const name = req.url.split("/")[2];
      const entry = routes.get(name);
      requests.push({ name, url: req.url, method: req.method, headers: req.headers, body: raw ? JSON.parse(raw) : undefined });
      if (!entry) {
        res.writeHead(404).end();
        return;
      }
      entry.count += 1;
      entry.handler(req, res, raw ? JSON.parse(raw) : undefined, entry.count);
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  base = `http://127.0.0.1:${server.address().port}`;
});

after(() => {
  server.closeAllConnections();
  server.close();
});

function streamHead(res) {
  res.writeHead(200, { "Content-Type": "text/event-stream", "Cache-Control": "no-store" });
}

describe("streaming", () => {
  test("tokens, split chunks, keep-alives and the final response", async () => {
    const url = route("stream", async (req, res) => {
      streamHead(res);
      const text = ": ping\n\n" + sse(token("Hello", 1)) + sse(token("", 2)) + sse(token(" world", 2)) + sse(DONE);
      for (let i = 0; i < text.length; i += 7) {
        res.write(text.slice(i, i + 7)); // events split across chunks
        await sleep(1);
      }
      res.end();
    });
    const mesh = new FarMesh({ apiKey: "fl_test", baseUrl: url });
    const stream = mesh.chatStream([{ role: "user", content: "hi" }], {
      maxTokens: 2, temperature: 0, stop: "\n", model: "m", requestId: "r1",
    });
    assert.equal(stream.requestId, "r1");
    const tokens = [];
    for await (const t of stream) tokens.push(t);
    assert.deepEqual(tokens, ["Hello", " world"]);
    assert.equal(stream.text, "Hello world");
    assert.equal(stream.finishReason, "length");
    assert.deepEqual(stream.response.usage, { promptTokens: 3, completionTokens: 2, totalTokens: 5 });
    assert.equal(stream.response.costFar, "0.0002");
    assert.equal(stream.response.contributions[0].paymentFar, "0.00018");
    assert.equal(stream.response.contributions[0].workUnits, 8);
    const sent = requests.filter((r) => r.name === "stream").at(-1);
    assert.equal(sent.url, "/t/stream/mesh/inference/generate");
    assert.equal(sent.headers.authorization, "Bearer fl_test");
    assert.equal(sent.headers.accept, "text/event-stream");
    assert.deepEqual(sent.body, {
      messages: [{ role: "user", content: "hi" }], max_tokens: 2, temperature: 0, stop: ["\n"], model_id: "m",
      request_id: "r1", stream: true,
    });
  });

  test("penalties, logit bias and logprobs are sent; logprobs come back per token and in the response", async () => {
    const entry = { token: " world", logprob: -0.5, bytes: [32, 119, 111, 114, 108, 100],
      top_logprobs: [{ token: " world", logprob: -0.5, bytes: [32, 119, 111, 114, 108, 100] }] };
    const url = route("logprobs", (req, res) => {
      streamHead(res);
      res.end(sse({ ...token(" world", 1), logprobs: entry }) + sse(DONE));
    });
    const mesh = new FarMesh({ apiKey: "fl_test", baseUrl: url });
    const stream = mesh.chatStream("hi", {
      presencePenalty: 0.5, frequencyPenalty: 0.25, repetitionPenalty: 1.1, logitBias: { 42: -100 }, logprobs: 1,
    });
    const response = await stream.finalResponse();
    const expected = { token: " world", logprob: -0.5, bytes: entry.bytes,
      topLogprobs: [{ token: " world", logprob: -0.5, bytes: entry.bytes }] };
    assert.deepEqual(stream.lastEvent.logprobs, expected);
    assert.deepEqual(response.logprobs, [expected]);
    const sent = requests.filter((r) => r.name === "logprobs").at(-1).body;
    assert.deepEqual([sent.presence_penalty, sent.frequency_penalty, sent.repetition_penalty, sent.logit_bias,
      sent.logprobs], [0.5, 0.25, 1.1, { 42: -100 }, 1]);
    assert.equal(sent.temperature, undefined); // omitted: the model's recommended value
  });

  test("a replayed request (final event only) streams its stored text", async () => {
    const url = route("replay", (req, res) => {
      streamHead(res);
      res.end(sse(DONE));
    });
    const stream = new FarMesh({ apiKey: "k", baseUrl: url }).chatStream("hi");
    const tokens = [];
    for await (const t of stream) tokens.push(t);
    assert.deepEqual(tokens, ["Hello world"]);
    assert.equal((await stream.finalResponse()).text, "Hello world");
  });

  test("a stream that began is never retried; an error event throws GenerationError", async () => {
    const url = route("midstream", (req, res) => {
      streamHead(res);
      res.end(sse(token("Hi", 1)) + sse({ error: { code: "swarm_error", message: "server died" } }, "error"));
    });
    const stream = new FarMesh({ apiKey: "k", baseUrl: url, maxRetries: 5 }).chatStream("hi");
    const tokens = [];
    await assert.rejects(async () => {
      for await (const t of stream) tokens.push(t);
    }, (error) => error instanceof GenerationError && error.code === "swarm_error" && error.status === undefined);
    assert.deepEqual(tokens, ["Hi"]);
    assert.equal(routes.get("midstream").count, 1);
  });

  test("a stream cut before its final event is an APIConnectionError", async () => {
    const url = route("cut", (req, res) => {
      streamHead(res);
      res.end(sse(token("Hi", 1)));
    });
    await assert.rejects(new FarMesh({ apiKey: "k", baseUrl: url }).chatStream("hi").finalResponse(), APIConnectionError);
  });

  test("AbortSignal stops the stream and drops the connection", async () => {
    let closed;
    const closedPromise = new Promise((resolve) => (closed = resolve));
    const url = route("endless", async (req, res) => {
      streamHead(res);
      res.on("close", () => closed(true));
      for (let n = 1; !res.destroyed && n < 2000; n++) {
        res.write(sse(token("x", n)));
        await sleep(10);
      }
      res.end();
    });
    const controller = new AbortController();
    const stream = new FarMesh({ apiKey: "k", baseUrl: url }).chatStream("hi", { signal: controller.signal });
    let count = 0;
    await assert.rejects(async () => {
      for await (const _ of stream) {
        if (++count === 2) controller.abort();
      }
    }, (error) => error.name === "AbortError");
    assert.equal(count, 2);
    assert.equal(await closedPromise, true);

    // stream.abort() and breaking out of the loop drop the connection too
    const second = new FarMesh({ apiKey: "k", baseUrl: url }).chatStream("hi");
    await assert.rejects(async () => {
      for await (const _ of second) second.abort();
    }, (error) => error.name === "AbortError");
    const third = new FarMesh({ apiKey: "k", baseUrl: url }).chatStream("hi");
    for await (const _ of third) break;
    assert.equal(third.response, undefined);
  });

  test("an idle stream times out", async () => {
    const url = route("idle", (req, res) => {
      streamHead(res);
      res.write(sse(token("x", 1))); // then nothing
    });
    const stream = new FarMesh({ apiKey: "k", baseUrl: url, timeout: 300 }).chatStream("hi");
    await assert.rejects(stream.finalResponse(), APITimeoutError);
    assert.equal(stream.text, "x");
  });
});

describe("errors and retries", () => {
  const cases = [
    [401, { code: "invalid_credentials", message: "unknown API key" }, {}, AuthenticationError],
    [402, { code: "insufficient_balance", message: "low", required_far: "0.01", available_far: "0" }, {}, InsufficientBalanceError],
    [422, { code: "invalid_request", message: "max_tokens: too big" }, {}, InvalidRequestError],
    [400, { code: "prompt_too_long", message: "long" }, {}, InvalidRequestError],
    [404, { code: "model_not_found", message: "nope" }, {}, NotFoundError],
    [409, { code: "duplicate_request", message: "dup" }, {}, ConflictError],
    [502, { code: "swarm_error", message: "boom" }, {}, GenerationError],
    [429, { code: "rate_limited", message: "slow", retry_after_s: 7 }, { "Retry-After": "7" }, RateLimitError],
    [503, { code: "swarm_not_ready", message: "blocks", missing_blocks: [2, 3], loading_blocks: [], retry_after_s: 5 },
      { "Retry-After": "5" }, SwarmNotReadyError],
  ];
  for (const [status, error, headers, cls] of cases) {
    test(`${status} ${error.code} -> ${cls.name}`, async () => {
      const name = `err${status}${error.code}`;
      const url = route(name, (req, res) => {
        res.writeHead(status, { "Content-Type": "application/json", ...headers }).end(JSON.stringify({ error }));
      });
      const mesh = new FarMesh({ apiKey: "k", baseUrl: url, maxRetries: 0 });
      for (const call of [() => mesh.chat("hi"), () => mesh.chatStream("hi").finalResponse()]) {
        await assert.rejects(call(), (raised) => {
          assert.ok(raised instanceof cls, `${raised} is a ${cls.name}`);
          assert.equal(raised.status, status);
          assert.equal(raised.code, error.code);
          assert.equal(raised.name, cls.name);
          if (cls === InsufficientBalanceError) assert.equal(raised.requiredFar, "0.01");
          if (cls === RateLimitError) assert.equal(raised.retryAfter, 7);
          if (cls === SwarmNotReadyError) assert.deepEqual([raised.missingBlocks, raised.retryAfter], [[2, 3], 5]);
          return true;
        });
      }
      assert.equal(routes.get(name).count, 2); // no retry with maxRetries: 0
    });
  }

  test("429 then 503 are retried after Retry-After, with one idempotency key", async () => {
    const url = route("retry", (req, res, body, count) => {
      if (count === 1) {
        res.writeHead(429, { "Content-Type": "application/json", "Retry-After": "1" })
          .end(JSON.stringify({ error: { code: "rate_limited", message: "x", retry_after_s: 1 } }));
      } else if (count === 2) {
        res.writeHead(503, { "Content-Type": "application/json", "Retry-After": "0" })
          .end(JSON.stringify({ error: { code: "swarm_not_ready", message: "x", missing_blocks: [1] } }));
      } else {
        res.writeHead(200, { "Content-Type": "application/json" }).end(JSON.stringify(DONE));
      }
    });
    const started = Date.now();
    const reply = await new FarMesh({ apiKey: "k", baseUrl: url, maxRetries: 2 }).chat("hi");
    assert.equal(reply.text, "Hello world");
    assert.ok(Date.now() - started >= 950, "waited for Retry-After");
    const sent = requests.filter((r) => r.name === "retry");
    assert.equal(sent.length, 3);
    assert.equal(new Set(sent.map((r) => r.body.request_id)).size, 1);
  });

  test("retries are bounded", async () => {
    const url = route("bounded", (req, res) => {
      res.writeHead(503, { "Content-Type": "application/json", "Retry-After": "0" })
        .end(JSON.stringify({ error: { code: "swarm_not_ready", message: "x", missing_blocks: [3] } }));
    });
    await assert.rejects(new FarMesh({ apiKey: "k", baseUrl: url, maxRetries: 2 }).chat("hi"), SwarmNotReadyError);
    assert.equal(routes.get("bounded").count, 3);
  });

  test("connection refused is an APIConnectionError", async () => {
    const probe = createServer();
    await new Promise((resolve) => probe.listen(0, "127.0.0.1", resolve));
    const port = probe.address().port;
    await new Promise((resolve) => probe.close(resolve));
    await assert.rejects(new FarMesh({ apiKey: "k", baseUrl: `http://127.0.0.1:${port}`, maxRetries: 0 }).chat("hi"),
      (error) => error instanceof APIConnectionError && /ECONNREFUSED/.test(error.message));
    const started = Date.now(); // a request that never reached the server is retried (with backoff)
    await assert.rejects(new FarMesh({ apiKey: "k", baseUrl: `http://127.0.0.1:${port}`, maxRetries: 1 }).chat("hi"),
      APIConnectionError);
    assert.ok(Date.now() - started >= 450);
  });
});

describe("options", () => {
  test("FARLABS_API_KEY / FARLABS_BASE_URL, explicit options first", () => {
    const saved = [process.env.FARLABS_API_KEY, process.env.FARLABS_BASE_URL];
    try {
      process.env.FARLABS_API_KEY = "fl_env";
      process.env.FARLABS_BASE_URL = "http://127.0.0.1:9/";
      const fromEnv = new FarMesh();
      assert.equal(fromEnv.apiKey, "fl_env");
      assert.equal(fromEnv.baseUrl, "http://127.0.0.1:9");
      assert.equal(new FarMesh({ apiKey: "fl_arg", baseUrl: "http://127.0.0.1:10" }).baseUrl, "http://127.0.0.1:10");
    } finally {
      for (const [name, value] of [["FARLABS_API_KEY", saved[0]], ["FARLABS_BASE_URL", saved[1]]]) {
        if (value === undefined) delete process.env[name];
        else process.env[name] = value;
      }
    }
  });

  test("request body: prompt, defaults left to the server, a generated request_id", () => {
    const body = buildBody("hi", { topP: 0.9, topK: 0, seed: 1, userWallet: "0x1" }, false);
    assert.match(body.request_id, /^req_[0-9a-f]{32}$/);
    delete body.request_id;
    assert.deepEqual(body, { prompt: "hi", top_p: 0.9, top_k: 0, seed: 1, user_wallet: "0x1", stream: false });
  });
});
