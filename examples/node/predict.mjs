// Classify PNG (and JPEG) files with an exported ctedge model, in Node.js.
//   npm install --onnxruntime-node-install=skip && node predict.mjs ../../exports/model.onnx scan1.png scan2.png
// The host side of ctedge's I/O contract, as `ctedge predict` does it: gray levels
// 0-255, then the preprocessing contract recorded in the model's metadata
// (ctedge.preprocess.contract; 1 for exports made before it was recorded):
//   2: resize the longer side to the model's size (area average when shrinking, as
//      OpenCV's INTER_AREA; bilinear when enlarging), then pad to a square with 0;
//   1: pad to a square with 0, then resize.
// Then the gray repeated into 3 channels, float32 NHWC. Everything else (HU window,
// zero-centre, ImageNet scaling) is in the graph.
import fs from "node:fs";
import ort from "onnxruntime-node";
import sharp from "sharp";

// --- the model's metadata ----------------------------------------------------
// onnxruntime-node has no call for an ONNX file's metadata_props, so they are read
// from the file: ModelProto field 14, entries of key (1) and value (2).
function* fields(bytes) {
  let pos = 0;
  const varint = () => {
    let value = 0, scale = 1, byte;
    do {
      byte = bytes[pos++];
      value += (byte & 0x7f) * scale;
      scale *= 128;
    } while (byte & 0x80);
    return value;
  };
  while (pos < bytes.length) {
    const key = varint(), field = Math.floor(key / 8), wire = key & 7;
    if (wire === 0) yield [field, varint()];
    else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else if (wire === 2) {
      const length = varint();
      yield [field, bytes.subarray(pos, pos + length)];
      pos += length;
    } else throw new Error(`not an ONNX model (protobuf wire type ${wire})`);
  }
}

function metadataOf(modelBytes) {
  const text = new TextDecoder();
  const meta = {};
  for (const [field, value] of fields(modelBytes)) {
    if (field !== 14) continue;
    const entry = Object.fromEntries([...fields(value)].map(([f, v]) => [f, text.decode(v)]));
    meta[entry[1]] = entry[2];
  }
  return meta;
}

// --- pixels ------------------------------------------------------------------
// Gray levels as OpenCV gives Python: colour by its fixed-point BGR2GRAY (alpha
// ignored), 16-bit scaled to 0-255; no EXIF rotation (cv2.IMREAD_UNCHANGED).
const MIN_SIDE = 16, MAX_ASPECT = 4;

async function grayLevels(file) {
  const input = fs.readFileSync(file);
  const decoded = () => sharp(input, { ignoreIcc: true });
  const { depth, channels: bands, width: w, height: h } = await decoded().metadata();
  // ctedge's image limits (ctedge.core.imageio MIN_SIDE, MAX_ASPECT): no CT slice is smaller or a strip
  if (Math.min(w, h) < MIN_SIDE) throw new Error(`${w}x${h} pixels: a side under ${MIN_SIDE} px cannot hold a CT slice`);
  if (Math.max(w, h) > MAX_ASPECT * Math.min(w, h)) throw new Error(`${w}x${h} pixels: an aspect ratio over ${MAX_ASPECT}:1 cannot hold a CT slice`);
  const wide = depth === "ushort"; // sharp would turn 16 bits into 8-bit sRGB unless told
  const { data, info } = await (wide ? decoded().toColourspace(bands >= 3 ? "rgb16" : "grey16") : decoded())
    .raw({ depth: wide ? "ushort" : "uchar" }).toBuffer({ resolveWithObject: true });
  const { width, height, channels } = info;
  const pixels = wide ? new Uint16Array(data.buffer, data.byteOffset, data.length / 2) : data;
  const scale = wide ? Math.fround(255 / 65535) : 1;
  const gray = new Float32Array(width * height);
  for (let i = 0; i < width * height; i++) {
    const at = i * channels;
    const level = channels >= 3
      ? Math.floor((pixels[at] * 4899 + pixels[at + 1] * 9617 + pixels[at + 2] * 1868 + 8192) / 16384)
      : pixels[at];
    gray[i] = level * scale;
  }
  return { gray, width, height };
}

// OpenCV's INTER_AREA weights along one axis (computeResizeAreaTab): for each
// output index, [source index, weight] pairs.
function areaTable(source, target) {
  const scale = source / target;
  const table = [];
  for (let d = 0; d < target; d++) {
    const f1 = d * scale, f2 = f1 + scale, cell = Math.min(scale, source - f1);
    const s2 = Math.min(Math.floor(f2), source - 1);
    const s1 = Math.min(Math.ceil(f1), s2);
    const taps = [];
    if (s1 - f1 > 1e-3) taps.push([s1 - 1, (s1 - f1) / cell]);
    for (let s = s1; s < s2; s++) taps.push([s, 1 / cell]);
    if (f2 - s2 > 1e-3) taps.push([s2, Math.min(Math.min(f2 - s2, 1), cell) / cell]);
    table.push(taps);
  }
  return table;
}

// OpenCV's INTER_LINEAR taps along one axis (half-pixel centres, edges clamped).
function linearTable(source, target) {
  const scale = source / target;
  const table = [];
  for (let d = 0; d < target; d++) {
    let f = Math.fround((d + 0.5) * scale - 0.5), s = Math.floor(f);
    f -= s;
    if (s < 0) [f, s] = [0, 0];
    if (s >= source - 1) [f, s] = [0, source - 1];
    table.push(f === 0 ? [[s, 1]] : [[s, 1 - f], [s + 1, f]]);
  }
  return table;
}

// Resize a gray image (separable: rows, then columns), as cv2.resize does.
function resize(gray, width, height, newWidth, newHeight, area) {
  const table = area ? areaTable : linearTable;
  const xs = table(width, newWidth), ys = table(height, newHeight);
  const rows = new Float64Array(height * newWidth);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < newWidth; x++) {
      let sum = 0;
      for (const [s, w] of xs[x]) sum += w * gray[y * width + s];
      rows[y * newWidth + x] = sum;
    }
  }
  const out = new Float32Array(newWidth * newHeight);
  for (let y = 0; y < newHeight; y++) {
    for (let x = 0; x < newWidth; x++) {
      let sum = 0;
      for (const [s, w] of ys[y]) sum += w * rows[s * newWidth + x];
      out[y * newWidth + x] = sum;
    }
  }
  return out;
}

// Python's round(): halves to even.
function roundHalfEven(value) {
  const floor = Math.floor(value);
  const rest = value - floor;
  if (rest !== 0.5) return Math.round(value);
  return floor % 2 === 0 ? floor : floor + 1;
}

// Put a (width x height) gray image centred on a black square of side `side`.
function pad(gray, width, height, side) {
  const square = new Float32Array(side * side);
  const top = Math.floor((side - height) / 2), left = Math.floor((side - width) / 2);
  for (let y = 0; y < height; y++) square.set(gray.subarray(y * width, (y + 1) * width), (top + y) * side + left);
  return square;
}

function squareInput({ gray, width, height }, size, contract) {
  if (contract === 1) {
    const side = Math.max(width, height);
    return resize(pad(gray, width, height, side), side, side, size, size, side > size);
  }
  const scale = size / Math.max(width, height);
  const newHeight = Math.max(1, Math.min(size, roundHalfEven(height * scale)));
  const newWidth = Math.max(1, Math.min(size, roundHalfEven(width * scale)));
  return pad(resize(gray, width, height, newWidth, newHeight, scale < 1), newWidth, newHeight, size);
}

function modelInput(image, size, contract) {
  const square = squareInput(image, size, contract);
  const out = new Float32Array(size * size * 3);
  square.forEach((value, i) => out.fill(value, 3 * i, 3 * i + 3));
  return out;
}

// --- main --------------------------------------------------------------------
const [modelPath, ...files] = process.argv.slice(2);
if (!modelPath || files.length === 0) {
  console.error("usage: node predict.mjs MODEL.onnx IMAGE.png...");
  process.exit(2);
}
const modelBytes = fs.readFileSync(modelPath);
const meta = metadataOf(modelBytes);
const input = JSON.parse(meta["ctedge.input"] ?? "{}");
const contract = JSON.parse(meta["ctedge.preprocess"] ?? "{}").contract ?? 1;
const session = await ort.InferenceSession.create(modelBytes);
const size = input.size ?? session.inputMetadata?.[0]?.shape?.[1];
let failed = 0;
for (const file of files) {
  try {
    const tensor = new ort.Tensor("float32", modelInput(await grayLevels(file), size, contract), [1, size, size, 3]);
    const { probability } = await session.run({ image: tensor });
    console.log(`${file}\t${probability.data[0].toFixed(6)}`);
  } catch (error) {
    failed++;
    console.log(`${file}\terror: ${error.message}`);
  }
}
process.exit(failed ? 1 : 0);
