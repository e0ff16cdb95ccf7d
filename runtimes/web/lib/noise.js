// Portable noise, bit for bit the same numbers as dcae_edge.schedules.portable_normals (Python):
// u32(k) = lowbias32(lowbias32(k ^ key)), key = lowbias32(seed ^ (0x9E3779B9 * (stream + 1))),
// two words -> one 53-bit uniform in (0, 1), Box-Muller (cos, sin) in float64 -> float32.

export const NOISE_GENERATOR = "dcae-lowbias32-boxmuller-v1";

function lowbias32(x) {
  x = x >>> 0;
  x ^= x >>> 16;
  x = Math.imul(x, 0x7feb352d) >>> 0;
  x ^= x >>> 15;
  x = Math.imul(x, 0x846ca68b) >>> 0;
  x ^= x >>> 16;
  return x >>> 0;
}

function keyOf(seed, stream) {
  const mix = Number((BigInt(0x9e3779b9) * BigInt(stream + 1)) & 0xffffffffn);
  return lowbias32((Number(BigInt.asUintN(32, BigInt(seed))) ^ mix) >>> 0);
}

function word(k, key) {
  return lowbias32(lowbias32(((k >>> 0) ^ key) >>> 0));
}

/** `count` standard normals (Float32Array) from position `offset` of (seed, stream). */
export function portableNormals(seed, count, stream = 0, offset = 0) {
  const key = keyOf(seed, stream);
  const out = new Float32Array(count);
  const first = Math.floor(offset / 2);
  let o = 0;
  let skip = offset % 2;
  for (let p = first; o < count; p++) {
    const k = (p * 4) >>> 0;
    const w0 = word(k, key), w1 = word(k + 1, key), w2 = word(k + 2, key), w3 = word(k + 3, key);
    const u1 = (Math.floor(w0 / 32) * 67108864 + Math.floor(w1 / 64) + 0.5) / 9007199254740992;
    const u2 = (Math.floor(w2 / 32) * 67108864 + Math.floor(w3 / 64) + 0.5) / 9007199254740992;
    const r = Math.sqrt(-2 * Math.log(u1));
    const theta = 2 * Math.PI * u2;
    const pair = [r * Math.cos(theta), r * Math.sin(theta)];
    for (const v of pair) {
      if (skip) { skip--; continue; }
      if (o < count) out[o++] = v;
    }
  }
  return out;
}

/** Starting noise of a seed (same as dcae_edge.schedules.initial_noise). */
export function initialNoise(size, seed) {
  return portableNormals(seed, size);
}

/** Fresh noise for ancestral samplers: stream 1, each draw starts on a fresh pair. */
export function stepNoise(seed) {
  let used = 0;
  return (size) => {
    const start = used + (used % 2);
    used = start + size;
    return portableNormals(seed, size, 1, start);
  };
}
