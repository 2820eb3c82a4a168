// What the live test files (test/live.test.mjs, test/react.test.mjs) share: the environment the Python suite sets
// (tests/test_sdk_typescript.py), skip rules, and exact FAR arithmetic. Kept outside test/ so `node --test test/`
// does not run it as a test file.
export const env = process.env;
export const BASE_URL = env.FARLABS_TEST_BASE_URL;
export const API_KEY = env.FARLABS_TEST_API_KEY;
export const live = BASE_URL && API_KEY ? {} : { skip: "FARLABS_TEST_BASE_URL / FARLABS_TEST_API_KEY not set (no live coordinator)" };
export const needs = (...names) => (BASE_URL && names.every((n) => env[n]) ? {} : { skip: `${names.join(", ")} not set` });
export const PROMPT = "def compute(a, b):";
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A decimal string in FAR -> integer base units (1e-18 FAR). */
export function units(far) {
  const [whole, fraction = ""] = far.split(".");
  return BigInt(whole) * 10n ** 18n + BigInt((fraction + "0".repeat(18)).slice(0, 18));
}
