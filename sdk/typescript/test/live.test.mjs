// Live tests against a coordinator on a live swarm. They SKIP unless FARLABS_TEST_BASE_URL is set; the Python
// suite (tests/test_sdk_typescript.py) starts the coordinators and sets:
//   FARLABS_TEST_BASE_URL, FARLABS_TEST_API_KEY   a ready coordinator and a funded key
//   FARLABS_TEST_BROKE_KEY                        a key of an account with balance 0        (402)
//   FARLABS_TEST_LIMITED_KEY                      a key limited to 1 request per minute     (429)
//   FARLABS_TEST_NOT_READY_URL, _NOT_READY_KEY    a coordinator whose swarm lacks blocks 2-3 (503)
//   FARLABS_TEST_ACCOUNT_KEY                      a key of a new account granted 5 FAR, used by nothing else
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  AuthenticationError,
  FarMesh,
  InsufficientBalanceError,
  InvalidRequestError,
  NotFoundError,
  RateLimitError,
  SwarmNotReadyError,
} from "../dist/index.js";

import { API_KEY, BASE_URL, env, live, needs, PROMPT, sleep, units } from "../testing/live-env.mjs";

function client(options = {}) {
  return new FarMesh({ apiKey: API_KEY, baseUrl: BASE_URL, maxRetries: 0, timeout: 120_000, ...options });
}

async function waitFinal(mesh, requestId) {
  const deadline = Date.now() + 20_000;
  let status = await mesh.status(requestId);
  while (status.status === "running" && Date.now() < deadline) {
    await sleep(200);
    status = await mesh.status(requestId);
  }
  return status;
}

describe("live coordinator", live, () => {
  test("greedy: streamed text equals the non-streamed text", async () => {
    const mesh = client();
    const full = await mesh.chat(PROMPT, { maxTokens: 24, temperature: 0 });
    const stream = mesh.chatStream(PROMPT, { maxTokens: 24, temperature: 0 });
    const tokens = [];
    for await (const token of stream) tokens.push(token);
    assert.ok(tokens.length >= 2);
    assert.equal(tokens.join(""), full.text);
    assert.equal(stream.response.text, full.text);
    assert.equal(stream.finishReason, "length");
    assert.equal(full.usage.completionTokens, 24);
    assert.deepEqual(stream.response.usage, full.usage);
    assert.equal(stream.response.costFar, full.costFar);
    assert.ok(units(full.costFar) > 0n);
    for (const response of [full, stream.response]) {
      assert.deepEqual(response.contributions.map((c) => c.blocks).sort(), ["0:2", "2:4"]);
      const paid = response.contributions.reduce((sum, c) => sum + units(c.paymentFar), 0n);
      assert.equal(paid + units(response.feeFar), units(response.costFar));
    }
    const status = await mesh.status(stream.requestId);
    assert.equal(status.status, "completed");
    assert.equal(status.tokensGenerated, 24);
  });

  test("chat messages and models", async () => {
    const mesh = client();
    const reply = await mesh.chat([{ role: "system", content: "Be brief." }, { role: "user", content: "Hi" }],
      { maxTokens: 8, temperature: 0 });
    assert.ok(reply.usage.completionTokens <= 8);
    const models = await mesh.models();
    assert.equal(models[0].id, "far-mesh/tiny-llama");
    assert.equal(models[0].ready, true);
    assert.deepEqual(models[0].missingBlocks, []);
  });

  test("cancel stops the stream (finishReason cancelled)", async () => {
    const mesh = client();
    const stream = mesh.chatStream(PROMPT, { maxTokens: 200, temperature: 0 });
    let count = 0;
    for await (const _ of stream) {
      if (++count === 3) assert.equal(await stream.cancel(), "cancelling");
    }
    assert.equal(stream.finishReason, "cancelled");
    assert.ok(stream.response.usage.completionTokens < 200);
    assert.equal((await mesh.status(stream.requestId)).status, "cancelled");
  });

  test("AbortSignal drops the connection and the coordinator cancels", async () => {
    const mesh = client();
    const controller = new AbortController();
    const stream = mesh.chatStream(PROMPT, { maxTokens: 200, temperature: 0, signal: controller.signal });
    let count = 0;
    await assert.rejects(async () => {
      for await (const _ of stream) {
        if (++count === 2) controller.abort();
      }
    }, (error) => error.name === "AbortError");
    const status = await waitFinal(mesh, stream.requestId);
    assert.equal(status.status, "cancelled");
    assert.ok(status.tokensGenerated < 200);
  });

  test("401 AuthenticationError, 422 InvalidRequestError, 404 NotFoundError", async () => {
    await assert.rejects(client({ apiKey: "fl_wrong" }).chat("hi", { maxTokens: 1 }),
      (error) => error instanceof AuthenticationError && error.status === 401);
    await assert.rejects(client().chat("hi", { maxTokens: 10_000 }), InvalidRequestError);
    await assert.rejects(client().chatStream("hi", { model: "nope/nope" }).finalResponse(), NotFoundError);
    await assert.rejects(client().cancel("req_does_not_exist"), NotFoundError);
  });

  test("402 InsufficientBalanceError", needs("FARLABS_TEST_BROKE_KEY"), async () => {
    await assert.rejects(client({ apiKey: env.FARLABS_TEST_BROKE_KEY }).chatStream("hi", { maxTokens: 4 }).finalResponse(),
      (error) => error instanceof InsufficientBalanceError && units(error.requiredFar) > 0n &&
        units(error.availableFar) === 0n);
  });

  test("429 RateLimitError", needs("FARLABS_TEST_LIMITED_KEY"), async () => {
    const mesh = client({ apiKey: env.FARLABS_TEST_LIMITED_KEY });
    await assert.rejects(async () => {
      // a fixed one-minute window: the 2nd request is limited unless the window just rolled over
      for (let i = 0; i < 3; i++) await mesh.chat("hi", { maxTokens: 1 });
    }, (error) => error instanceof RateLimitError && error.status === 429 && error.retryAfter >= 1);
  });

  test("balance() and usage() follow what requests cost", needs("FARLABS_TEST_ACCOUNT_KEY"), async () => {
    const mesh = client({ apiKey: env.FARLABS_TEST_ACCOUNT_KEY });
    const before = await mesh.balance();
    assert.equal(units(before.balanceFar), 5n * 10n ** 18n);
    assert.equal(units(before.grantedFar), units(before.balanceFar) + units(before.chargedFar));
    assert.equal(units(before.availableFar), units(before.balanceFar) - units(before.reservedFar));
    assert.equal(units(before.reservedFar), 0n);
    assert.equal(before.deposit, null); // the test coordinator has no deposit contract
    assert.match(before.accountId, /^[0-9a-f-]{36}$/);
    const empty = await mesh.usage();
    assert.deepEqual([empty.requests, empty.daily, empty.totals.requests, units(empty.totals.costFar)], [[], [], 0, 0n]);

    const first = await mesh.chat(PROMPT, { maxTokens: 4, temperature: 0 });
    const second = await mesh.chat("Hello", { maxTokens: 6, temperature: 0 });
    const spent = units(first.costFar) + units(second.costFar);
    assert.ok(spent > 0n);
    const after = await mesh.balance();
    assert.equal(units(after.chargedFar), spent);
    assert.equal(units(after.balanceFar), units(before.balanceFar) - spent);
    assert.equal(units(after.availableFar), units(after.balanceFar));
    assert.equal(after.accountId, before.accountId);

    const usage = await mesh.usage({ limit: 10, days: 7 });
    assert.deepEqual(usage.requests.map((r) => r.requestId), [second.requestId, first.requestId]); // newest first
    assert.equal(usage.nextBefore, null);
    for (const [row, reply] of [[usage.requests[0], second], [usage.requests[1], first]]) {
      assert.equal(row.status, "completed");
      assert.equal(row.modelId, "far-mesh/tiny-llama");
      assert.equal(row.completionTokens, reply.usage.completionTokens);
      assert.equal(row.promptTokens, reply.usage.promptTokens);
      assert.equal(row.costFar, reply.costFar);
      assert.ok(units(row.reservedFar) >= units(row.costFar));
      assert.ok(row.finalizedAt);
      assert.deepEqual(row.nodes.map((n) => [n.blocks, n.peerId, n.paymentFar]).sort(),
        reply.contributions.map((c) => [c.blocks, c.peerId, c.paymentFar]).sort());
    }
    // one UTC day, or two if the requests straddled midnight
    assert.ok(usage.daily.length >= 1 && usage.daily.length <= 2, JSON.stringify(usage.daily));
    for (const day of usage.daily) assert.match(day.day, /^\d{4}-\d{2}-\d{2}$/);
    assert.equal(usage.daily.reduce((n, day) => n + day.requests, 0), 2);
    assert.equal(usage.daily.reduce((sum, day) => sum + units(day.costFar), 0n), spent);
    assert.equal(usage.totals.requests, 2);
    assert.equal(usage.totals.completionTokens, first.usage.completionTokens + second.usage.completionTokens);
    assert.equal(units(usage.totals.costFar), spent);

    // Paging: one request per page, `nextBefore` -> `before`.
    const page1 = await mesh.usage({ limit: 1 });
    assert.deepEqual(page1.requests.map((r) => r.requestId), [second.requestId]);
    assert.ok(page1.nextBefore);
    const page2 = await mesh.usage({ limit: 1, before: page1.nextBefore });
    assert.deepEqual(page2.requests.map((r) => r.requestId), [first.requestId]);
    const page3 = await mesh.usage({ limit: 1, before: new Date(page2.nextBefore) });
    assert.deepEqual(page3.requests, []);
    assert.equal(page3.totals.requests, 2); // totals are over the whole history, whatever the page
  });

  test("balance() of an empty account; 401 and 422 from the account API", needs("FARLABS_TEST_BROKE_KEY"), async () => {
    const broke = await client({ apiKey: env.FARLABS_TEST_BROKE_KEY }).balance();
    assert.equal(units(broke.availableFar), 0n);
    assert.equal(units(broke.balanceFar), 0n);
    await assert.rejects(client({ apiKey: "fl_wrong" }).balance(),
      (error) => error instanceof AuthenticationError && error.status === 401);
    await assert.rejects(client({ apiKey: "fl_wrong" }).usage(), AuthenticationError);
    await assert.rejects(client().usage({ limit: 0 }), (error) => error instanceof InvalidRequestError && error.status === 422);
    await assert.rejects(client().usage({ days: 400 }), InvalidRequestError);
    await assert.rejects(client().usage({ before: "not a date" }), InvalidRequestError);
  });

  test("503 SwarmNotReadyError with missingBlocks", needs("FARLABS_TEST_NOT_READY_URL", "FARLABS_TEST_NOT_READY_KEY"),
    async () => {
      const mesh = new FarMesh({ apiKey: env.FARLABS_TEST_NOT_READY_KEY, baseUrl: env.FARLABS_TEST_NOT_READY_URL,
        maxRetries: 0 });
      await assert.rejects(mesh.chatStream("hi", { maxTokens: 4 }).finalResponse(), (error) => {
        assert.ok(error instanceof SwarmNotReadyError, String(error));
        assert.equal(error.status, 503);
        assert.deepEqual(error.missingBlocks, [2, 3]);
        assert.ok(error.retryAfter > 0);
        return true;
      });
      const [model] = await mesh.models();
      assert.equal(model.ready, false);
    });
});
