// `@farlabs/sdk/react` (useFarMesh) rendered by React in a jsdom DOM (React Testing Library) against a LIVE
// coordinator: the same environment variables as test/live.test.mjs; the tests skip without them.
// `global-jsdom/register` must come first: it puts jsdom's window/document on globalThis (Node's own fetch,
// AbortController and streams stay, so the hook's requests are real HTTP to the coordinator).
import "global-jsdom/register";

import assert from "node:assert/strict";
import { afterEach, describe, test } from "node:test";

import { cleanup, fireEvent, render, screen, waitFor } from "@testing-library/react";
import { createElement as h } from "react";

// Imported by the package's own name: resolved through package.json "exports" (the "./react" entry), as an app would.
import { FarMesh, InsufficientBalanceError } from "@farlabs/sdk";
import { useFarMesh } from "@farlabs/sdk/react";

import { API_KEY, BASE_URL, env, live, needs, PROMPT, sleep, units } from "../testing/live-env.mjs";

const WAIT = { timeout: 60_000, interval: 20 };

/** A chat box as an app would write it. `hook.current` is the hook's last value, `hook.chats` what chat() resolved. */
function ChatBox({ apiKey, maxTokens, hook }) {
  const mesh = useFarMesh({ apiKey, baseUrl: BASE_URL, maxRetries: 0, timeout: 120_000 });
  hook.current = mesh;
  const status = mesh.loading ? "loading" : mesh.error ? `error ${mesh.error.name}` : mesh.cancelled ? "cancelled"
    : mesh.response ? "done" : "idle";
  return h("div", null,
    h("button", { onClick: () => hook.chats.push(mesh.chat(PROMPT, { maxTokens, temperature: 0 })) }, "send"),
    h("button", { onClick: mesh.cancel, disabled: !mesh.loading }, "stop"),
    h("output", { "data-testid": "text" }, mesh.text),
    h("span", { "data-testid": "status" }, status),
    h("span", { "data-testid": "tokens" }, String(mesh.tokensGenerated)),
    mesh.usage && h("span", { "data-testid": "usage" }, `${mesh.usage.completionTokens} tokens, ${mesh.costFar} FAR`),
    mesh.error && h("p", { role: "alert" }, mesh.error.message));
}

function mount(apiKey, maxTokens) {
  const hook = { current: undefined, chats: [] };
  hook.unmount = render(h(ChatBox, { apiKey, maxTokens, hook })).unmount;
  return hook;
}

/** The coordinator's final status of a request (polls while it is still running, at most 20 s). */
async function finalStatus(client, requestId) {
  let status = await client.status(requestId);
  for (let i = 0; i < 100 && status.status === "running"; i++) {
    await sleep(200);
    status = await client.status(requestId);
  }
  return status;
}

const text = () => screen.getByTestId("text").textContent;
const status = () => screen.getByTestId("status").textContent;

describe("react useFarMesh (live coordinator)", live, () => {
  afterEach(cleanup); // node:test has no global afterEach for Testing Library to hook into

  test("a streamed answer appears in the DOM token by token and completes with usage", async () => {
    const reference = await new FarMesh({ apiKey: API_KEY, baseUrl: BASE_URL, maxRetries: 0 })
      .chat(PROMPT, { maxTokens: 24, temperature: 0 });
    const hook = mount(API_KEY, 24);
    assert.equal(status(), "idle");
    // What the DOM showed, each time it changed while the answer streamed in.
    const seen = [];
    const observer = new MutationObserver(() => seen.push({ text: text(), status: status() }));
    observer.observe(document.body, { subtree: true, childList: true, characterData: true });
    fireEvent.click(screen.getByText("send"));
    assert.equal(status(), "loading");
    assert.equal(screen.getByText("stop").disabled, false);
    await waitFor(() => assert.equal(status(), "done"), WAIT);
    observer.disconnect();

    const partial = [...new Set(seen.filter((s) => s.status === "loading" && s.text).map((s) => s.text))];
    assert.ok(partial.length >= 3, `the text grew in ${partial.length} steps: ${JSON.stringify(partial)}`);
    for (let i = 1; i < partial.length; i++) assert.ok(partial[i].startsWith(partial[i - 1]) && partial[i] !== partial[i - 1]);
    assert.ok(partial[0].length < reference.text.length && reference.text.startsWith(partial.at(-1)));

    assert.equal(text(), reference.text);
    const mesh = hook.current;
    assert.equal(mesh.loading, false);
    assert.equal(mesh.error, undefined);
    assert.equal(mesh.tokens.join(""), reference.text);
    assert.equal(mesh.finishReason, "length");
    assert.deepEqual(mesh.usage, reference.usage);
    assert.equal(mesh.costFar, reference.costFar);
    assert.ok(units(mesh.costFar) > 0n);
    assert.equal(screen.getByTestId("usage").textContent, `24 tokens, ${reference.costFar} FAR`);
    const response = await hook.chats[0];
    assert.equal(response, mesh.response);
    assert.equal(response.requestId, mesh.requestId);
    assert.equal((await mesh.client.status(mesh.requestId)).status, "completed");
  });

  test("an insufficient balance (402) lands in error as InsufficientBalanceError", needs("FARLABS_TEST_BROKE_KEY"),
    async () => {
      const hook = mount(env.FARLABS_TEST_BROKE_KEY, 8);
      fireEvent.click(screen.getByText("send"));
      await waitFor(() => assert.equal(status(), "error InsufficientBalanceError"), WAIT);
      const mesh = hook.current;
      assert.ok(mesh.error instanceof InsufficientBalanceError);
      assert.equal(mesh.error.status, 402);
      assert.equal(units(mesh.error.availableFar), 0n);
      assert.ok(units(mesh.error.requiredFar) > 0n);
      assert.equal(mesh.loading, false);
      assert.equal(mesh.text, "");
      assert.equal(mesh.response, undefined);
      assert.match(screen.getByRole("alert").textContent, /deposit at least [0-9.]+ FAR/);
      assert.equal(await hook.chats[0], undefined); // chat() resolves, never rejects
    });

  test("cancel() mid-stream stops it: loading false, no error, the coordinator cancels", async () => {
    const hook = mount(API_KEY, 200);
    fireEvent.click(screen.getByText("send"));
    await waitFor(() => assert.ok(Number(screen.getByTestId("tokens").textContent) >= 3), WAIT);
    fireEvent.click(screen.getByText("stop"));
    assert.equal(status(), "cancelled");
    const mesh = hook.current;
    assert.equal(mesh.loading, false);
    assert.equal(mesh.error, undefined);
    assert.equal(mesh.cancelled, true);
    assert.equal(screen.getByText("stop").disabled, true);
    assert.equal(await hook.chats[0], undefined);
    const shown = text();
    assert.ok(shown.length > 0);

    // The HTTP stream was dropped: the coordinator finalizes the request as cancelled, well short of 200 tokens.
    const final = await finalStatus(mesh.client, mesh.requestId);
    assert.equal(final.status, "cancelled");
    // (a few more tokens than shown, 0-2 here: the coordinator notices the dropped connection at a token step)
    assert.ok(final.tokensGenerated <= mesh.tokensGenerated + 50, `${final.tokensGenerated} > ${mesh.tokensGenerated} + 50`);
    // Nothing more reached the DOM after the cancel.
    await sleep(300);
    assert.equal(text(), shown);
    assert.equal(status(), "cancelled");
    assert.equal(hook.current.tokensGenerated, mesh.tokensGenerated);
  });

  test("unmounting the component drops a running stream", async () => {
    const hook = mount(API_KEY, 200);
    fireEvent.click(screen.getByText("send"));
    await waitFor(() => assert.ok(Number(screen.getByTestId("tokens").textContent) >= 2), WAIT);
    const mesh = hook.current;
    hook.unmount();
    assert.equal(await hook.chats[0], undefined);
    const final = await finalStatus(mesh.client, mesh.requestId);
    assert.equal(final.status, "cancelled");
    assert.ok(final.tokensGenerated < 200, String(final.tokensGenerated));
  });
});
