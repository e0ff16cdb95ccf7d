// precision "auto" in the browser (lib/precision.js) on injected timings: no browser, no bundle files.
import { test } from "node:test";
import assert from "node:assert/strict";

import { cacheKey, choose, gated, NO_SHADER_F16, resolveAuto } from "../lib/precision.js";
import { fallingBackToFp32, NonFiniteOutput } from "../lib/bundle.js";

const art = (pass) => ({ files: ["x.onnx"], ...(pass === undefined ? {} : { validation: { pass } }) });
const manifest = (arts, files = { "vae_decoder/model.onnx": { sha256: "ab", bytes: 1 } }) => ({
  files, graphs: { vae_decoder: { artifacts: arts } },
});

class MemoryStorage { // localStorage's interface
  constructor(items = {}) { this.items = { ...items }; }
  getItem(k) { return k in this.items ? this.items[k] : null; }
  setItem(k, v) { this.items[k] = String(v); }
}

test("gated: artifacts that exist and passed their check; fp32 needs no recorded check", () => {
  const m = manifest({ "onnx/fp32": art(), "onnx/fp16": art(false), "onnx/int8": art(true), "openvino/int8": art(true) });
  assert.deepEqual(gated(m, "vae_decoder"), ["fp32", "int8"]);
  assert.deepEqual(gated(manifest({ "onnx/fp32": art(), "onnx/int8": art() }), "vae_decoder"), ["fp32"]); // int8 never checked
  assert.deepEqual(gated(m, "transformer"), []);
});

test("choose: the fastest gated precision; a tie within 5% goes to the more accurate one", () => {
  assert.deepEqual(choose({ fp32: 600, int8: 400 }, ["fp32", "int8"])[0], "int8");
  const [p, why] = choose({ fp32: 410, int8: 400 }, ["fp32", "int8"]);
  assert.equal(p, "fp32");
  assert.match(why, /level with int8 within 5%, and more accurate/);
  assert.equal(choose({ fp32: 600, int8: 100 }, ["fp32"])[0], "fp32"); // a failed gate is never picked, however fast
  assert.equal(choose({ fp32: null, int8: null }, ["fp32", "int8"])[0], "fp32");
});

test("resolveAuto: times what is not remembered, remembers it, reuses it; never a failed gate", async () => {
  const m = manifest({ "onnx/fp32": art(), "onnx/fp16": art(true), "onnx/int8": art(true) });
  const storage = new MemoryStorage();
  const timed = [];
  const time = async (p) => { timed.push(p); return { fp32: 600, int8: 420 }[p]; };
  const key = cacheKey(m, "wasm", 2, "test");
  const first = await resolveAuto(m, "vae_decoder", "wasm", { time, storage, key });
  assert.equal(first.precision, "int8");
  assert.equal(first.source, "timed");
  assert.deepEqual(timed, ["fp32", "int8"]); // fp16 is not worth timing on WASM: no fp16 arithmetic there
  assert.deepEqual(first.skipped, [{ precision: "fp16", why: "no fp16 arithmetic there" }]);
  assert.deepEqual(JSON.parse(storage.getItem(key)).vae_decoder, { fp32: 600, int8: 420 });
  const again = await resolveAuto(m, "vae_decoder", "wasm", { time, storage, key });
  assert.equal(again.source, "remembered");
  assert.equal(timed.length, 2);
  // another bundle (other checksums), backend or thread count: timed again
  assert.notEqual(cacheKey(manifest({}, { "vae_decoder/model.onnx": { sha256: "cd", bytes: 1 } }), "wasm", 2, "test"), key);
  assert.notEqual(cacheKey(m, "wasm", 1, "test"), key);
  assert.notEqual(cacheKey(m, "webgpu", 2, "test"), key);
  // the INT8 gate failed: int8 is not even timed, fp32 is the only candidate
  const failed = manifest({ "onnx/fp32": art(), "onnx/int8": art(false) });
  const only = await resolveAuto(failed, "vae_decoder", "wasm", { time: async () => assert.fail("timed"), storage: new MemoryStorage(), key: "k" });
  assert.equal(only.precision, "fp32");
  assert.equal(only.source, "only");
});

test("resolveAuto: an unreadable memory is timed again; a precision that cannot run is left out", async () => {
  const m = manifest({ "onnx/fp32": art(), "onnx/int8": art(true) });
  for (const junk of ["{\"vae_decoder\": {\"fp32\": 3.0", "[1, 2]", "{\"vae_decoder\": {\"fp32\": \"fast\", \"int8\": -1}}"]) {
    const storage = new MemoryStorage({ k: junk });
    const res = await resolveAuto(m, "vae_decoder", "wasm", { time: async (p) => ({ fp32: 5, int8: 9 }[p]), storage, key: "k" });
    assert.equal(res.precision, "fp32");
    assert.equal(res.source, "timed");
  }
  const storage = new MemoryStorage();
  const broken = await resolveAuto(m, "vae_decoder", "wasm", {
    time: async (p) => { if (p === "int8") throw new Error("no kernel"); return 7; }, storage, key: "k" });
  assert.equal(broken.precision, "fp32");
  assert.match(broken.why, /fp32 7\.0 ms \(the only one timed\)/);
  assert.deepEqual(JSON.parse(storage.getItem("k")).vae_decoder, { fp32: 7 }); // not remembered: tried again next visit
  const retried = [];
  await resolveAuto(m, "vae_decoder", "wasm", { time: async (p) => { retried.push(p); return 5; }, storage, key: "k" });
  assert.deepEqual(retried, ["int8"]);
});

test("resolveAuto on WebGPU: fp32 and fp16 timed; fp16 left out, with the reason, on an adapter without shader-f16", async () => {
  const m = manifest({ "onnx/fp32": art(), "onnx/fp16": art(true), "onnx/int8": art(true) });
  const timed = [];
  const time = async (p) => { timed.push(p); return { fp32: 30, fp16: 12 }[p]; };
  const gpu = await resolveAuto(m, "vae_decoder", "webgpu", { time, device: { shaderF16: true } });
  assert.equal(gpu.precision, "fp16");
  assert.deepEqual(timed, ["fp32", "fp16"]);
  assert.match(gpu.skipped[0].why, /no QuantizeLinear kernel/);
  const noF16 = await resolveAuto(m, "vae_decoder", "webgpu", { time: async () => assert.fail("timed"), device: { shaderF16: false } });
  assert.equal(noF16.precision, "fp32");
  assert.equal(noF16.source, "only");
  assert.deepEqual(noF16.skipped.map((s) => s.precision), ["fp16", "int8"]);
  assert.equal(noF16.skipped[0].why, NO_SHADER_F16);
});

test("an overflow under auto runs that call again at fp32, and every later one; fp32's own NaN stands", async () => {
  const graph = (name, outputs) => ({ name, calls: 0, async run() {
    this.calls++;
    const out = outputs.shift();
    if (out instanceof Error) throw out;
    return out;
  } });
  const overflow = () => new NonFiniteOutput("vae_decoder fp16 on webgpu returned 3 NaN/Inf values");
  const fp16 = graph("fp16", [overflow(), overflow()]);
  const fp32 = graph("fp32", [Float32Array.of(1), Float32Array.of(2)]);
  const told = [];
  let opened = 0;
  const g = fallingBackToFp32(fp16, "fp16", async () => { opened++; return fp32; }, (e) => told.push(e.message));
  assert.deepEqual(Array.from(await g.run({})), [1]);
  assert.deepEqual(Array.from(await g.run({})), [2]); // stays at fp32: fp16 is not asked again
  assert.deepEqual([fp16.calls, fp32.calls, opened, told.length], [1, 2, 1, 1]);
  assert.match(told[0], /returned 3 NaN\/Inf/);
  // other errors are not an overflow; and at fp32 (or after the fallback) NaN is an error for the caller
  const broken = fallingBackToFp32(graph("int8", [new Error("lost device")]), "int8", async () => fp32);
  await assert.rejects(broken.run({}), /lost device/);
  const atFp32 = graph("fp32", [overflow()]);
  assert.equal(fallingBackToFp32(atFp32, "fp32", async () => assert.fail("no fallback from fp32")), atFp32);
  const twice = fallingBackToFp32(graph("fp16", [overflow()]), "fp16", async () => graph("fp32", [overflow()]));
  await assert.rejects(twice.run({}), NonFiniteOutput);
});
