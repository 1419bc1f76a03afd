// Classify 8-bit PNG files with an exported ctedge model, in Node.js.
//   npm install && node predict.mjs ../../exports/model.onnx scan1.png scan2.png
// The host side of ctedge's I/O contract: gray levels 0-255, pad to a square
// with 0, resize to the model's size, repeat into 3 channels, float32 NHWC.
// Everything else (HU window, zero-centre, ImageNet scaling) is in the graph.
import fs from "node:fs";
import ort from "onnxruntime-node";
import { PNG } from "pngjs";

function grayLevels(png) {
  const { width, height, data } = png; // RGBA, 8-bit
  const gray = new Float32Array(width * height);
  for (let i = 0; i < width * height; i++) {
    gray[i] = 0.299 * data[4 * i] + 0.587 * data[4 * i + 1] + 0.114 * data[4 * i + 2];
  }
  return { gray, width, height };
}

// Pad to a square (image centred, black border), then resize to size x size:
// area averaging when shrinking (as OpenCV's INTER_AREA), bilinear when enlarging.
function modelInput({ gray, width, height }, size) {
  const side = Math.max(width, height);
  const top = Math.floor((side - height) / 2), left = Math.floor((side - width) / 2);
  const at = (y, x) => {
    const iy = y - top, ix = x - left;
    return iy >= 0 && iy < height && ix >= 0 && ix < width ? gray[iy * width + ix] : 0;
  };
  const scale = side / size;
  const out = new Float32Array(size * size * 3);
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      let v;
      if (scale > 1) {
        const y0 = y * scale, y1 = (y + 1) * scale, x0 = x * scale, x1 = (x + 1) * scale;
        let sum = 0, weight = 0;
        for (let sy = Math.floor(y0); sy < Math.ceil(y1); sy++) {
          const wy = Math.min(sy + 1, y1) - Math.max(sy, y0);
          for (let sx = Math.floor(x0); sx < Math.ceil(x1); sx++) {
            const w = wy * (Math.min(sx + 1, x1) - Math.max(sx, x0));
            sum += w * at(sy, sx);
            weight += w;
          }
        }
        v = sum / weight;
      } else {
        const sy = Math.max((y + 0.5) * scale - 0.5, 0), sx = Math.max((x + 0.5) * scale - 0.5, 0);
        const y0 = Math.floor(sy), x0 = Math.floor(sx), dy = sy - y0, dx = sx - x0;
        v = (1 - dy) * ((1 - dx) * at(y0, x0) + dx * at(y0, x0 + 1))
          + dy * ((1 - dx) * at(y0 + 1, x0) + dx * at(y0 + 1, x0 + 1));
      }
      out.fill(v, 3 * (y * size + x), 3 * (y * size + x) + 3);
    }
  }
  return out;
}

const [modelPath, ...files] = process.argv.slice(2);
if (!modelPath || files.length === 0) {
  console.error("usage: node predict.mjs MODEL.onnx IMAGE.png...");
  process.exit(2);
}
const session = await ort.InferenceSession.create(modelPath);
const size = session.inputMetadata?.[0]?.shape?.[1] ?? 300;
for (const file of files) {
  try {
    const input = modelInput(grayLevels(PNG.sync.read(fs.readFileSync(file))), size);
    const tensor = new ort.Tensor("float32", input, [1, size, size, 3]);
    const { probability } = await session.run({ image: tensor });
    console.log(`${file}\t${probability.data[0].toFixed(4)}`);
  } catch (error) {
    console.log(`${file}\terror: ${error.message}`);
  }
}
