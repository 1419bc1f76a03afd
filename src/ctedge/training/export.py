"""`ctedge export --onnx`: the trained Keras model as a verified ONNX file.

convert (tf2onnx) -> graph checks (onnx checker, no training-time ops) ->
metadata -> parity against Keras on real or generated images -> atomic write.
FP16 and INT8 variants get their own parity figures against the fp32 Keras
model, recorded in their model cards; one beyond tolerance is dropped (or
written and marked flagged, with ``keep_flagged``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ctedge import __version__
from ctedge.core.errors import CheckFailed, CtedgeError
from ctedge.core.files import file_digest
from ctedge.core.imageio import DEFAULT_MAX_PIXELS
from ctedge.core.metadata import PREPROCESS_CONTRACT
from ctedge.core.metrics import DEFAULT_THRESHOLD
from ctedge.core.preprocess import PreprocessConfig
from ctedge.core.results import save_json
from ctedge.core.runconfig import RunConfig, keras_preprocess_config

INPUT_NAME = "image"
OUTPUT_NAME = "probability"
TRAINING_OPS = {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike",
                "Multinomial", "Bernoulli", "Dropout"}


@dataclass(kw_only=True)
class ExportOptions:
    opset: int = 17
    fp16: bool = False
    int8: bool = False
    calibration_data: str | None = None
    calibration_count: int = 64
    check_data: str | None = None
    check_count: int = 32
    threshold: float = DEFAULT_THRESHOLD
    tolerance: float = 1e-4  # fp32: max |Keras - ORT|
    fp16_tolerance: float = 1e-2
    int8_tolerance: float = 0.05
    keep_flagged: bool = False  # write a variant beyond its tolerance (status flagged) instead of dropping it
    int8_per_channel: bool = True
    int8_reduce_range: bool = False
    int8_ops: list[str] = field(default_factory=lambda: ["Conv", "Gemm", "MatMul"])
    int8_format: str = "qdq"  # qdq | qoperator
    openvino: bool = False  # also OpenVINO IR (NAME_ov.xml) and NNCF INT8 IR (NAME_ov_int8.xml)
    ov_tolerance: float = 1e-4  # OpenVINO fp32: max |Keras - OpenVINO|
    bf16_tolerance: float = 0.05  # OpenVINO BF16 inference precision of the fp32 IR
    ov_int8_ignored_types: list[str] = field(default_factory=list)  # NNCF ignored scope (op types)
    allow_constant: bool = False  # export a model whose outputs on the check images are constant
    max_pixels: int = DEFAULT_MAX_PIXELS  # pixel budget of the check and calibration images (ctedge --max-pixels)


FLAGGED_MESSAGE = ("a flagged variant answers unlike the Keras model beyond its tolerance (see its "
                   "parity figures): it is dropped unless --keep-flagged; don't ship one unchecked")


# --- conversion and graph checks ---------------------------------------------

# tf2onnx's graph passes that act on what a Keras EfficientNet + head converts to; the others
# (Upsample, DequantizeLinear, Loop, QDQ and Einsum passes) find nothing there, and every pass
# deep-copies the graph first (B3's conversion: 20.5 -> 15.6 s here, the same outputs).
TF2ONNX_PASSES = ("optimize_transpose", "fold_constants", "merge_duplication", "reshape_optimizer",
                  "global_pool_optimizer", "remove_identity", "remove_back_to_back")


def convert(model, opset: int = 17) -> onnx.ModelProto:
    """Keras -> ONNX with a named, dynamic-batch NHWC float32 input."""
    import tensorflow as tf
    import tf2onnx
    from tf2onnx import optimizer

    size = int(model.input_shape[1])
    spec = [tf.TensorSpec((None, size, size, 3), tf.float32, name=INPUT_NAME)]
    passes = {name: factory for name, factory in optimizer._get_optimizers().items() if name in TF2ONNX_PASSES}
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset, optimizers=passes)
    old = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [OUTPUT_NAME if o == old else o for o in node.output]
    proto.graph.output[0].name = OUTPUT_NAME
    for value in (proto.graph.input[0], proto.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto


def check_graph(proto: onnx.ModelProto) -> None:
    """ONNX's full checker, and no random/dropout op may remain."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise CheckFailed(f"the exported graph fails onnx.checker: {exc}") from None
    training = sorted({n.op_type for n in proto.graph.node} & TRAINING_OPS)
    if training:
        raise CheckFailed(f"the exported graph holds training-time ops: {', '.join(training)}")


def set_metadata(proto: onnx.ModelProto, metadata: dict) -> None:
    """ctedge's keys as JSON strings, ONNX's Image.* conventions as plain strings."""
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if key.startswith("Image.") else json.dumps(value)


def build_metadata(model, model_path: Path, threshold: float, variant: str) -> dict:
    """Everything a host app needs to feed the model and read its output."""
    config = RunConfig.load(model_path)
    preprocess = keras_preprocess_config(model)
    classes = config.classes if config else ["negative", "positive"]
    return {
        "ctedge.version": __version__,
        "ctedge.variant": variant,
        "ctedge.classes": classes,
        "ctedge.backbone": config.model.backbone if config else "b3",
        "ctedge.positive_class": (config.positive if config else None) or classes[1],
        "ctedge.threshold": threshold,
        "ctedge.input": {"name": INPUT_NAME, "layout": "NHWC", "dtype": "float32",
                         "size": preprocess.image_size, "channels": 3, "pixel_range": [0, 255],
                         "host_steps": "gray levels 0-255 (DICOM: HU window -> 0-255), resize the "
                                       "longer side to size (aspect kept), pad to square with 0, "
                                       "repeat gray into 3 channels (preprocess contract 2)"},
        "ctedge.output": {"name": OUTPUT_NAME, "shape": ["batch", 1],
                          "meaning": "probability of the positive class"},
        "ctedge.preprocess": {**{k: v for k, v in preprocess.to_dict().items() if k != "augment"},
                              "contract": PREPROCESS_CONTRACT},
        "ctedge.source_model": {"path": str(model_path), "sha256": file_digest(model_path)},
        "ctedge.hyperparameters": config.hyperparameters() if config else {},
        "ctedge.training_data": {name: {k: part.get(k) for k in ("images", "positive", "negative")}
                                 for name, part in (config.splits if config else {}).items()},
        "Image.BitmapPixelFormat": "Rgb8",
        "Image.ColorSpaceGamma": "SRGB",
        "Image.NominalPixelRange": "NominalRange_0_255",
    }


# --- images for parity and calibration -----------------------------------------

def sample_images(folder: str | None, config: PreprocessConfig, count: int, seed: int = 0,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Up to ``count`` model inputs from a class-folder data set (labelled), a flat
    folder of images (unlabelled), or generated phantoms when ``folder`` is None;
    images above ``max_pixels`` are skipped as unreadable."""
    from ctedge.core.data import load_split, pick_samples
    from ctedge.core.phantoms import phantom
    from ctedge.core.preprocess import to_model_input

    if folder is None:
        rng = np.random.default_rng(seed)
        images = [to_model_input(phantom(rng, 96, bool(i % 2)).astype(np.float32), config.image_size)
                  for i in range(count)]
        return np.stack(images), np.arange(count) % 2, f"{count} generated phantoms"
    chosen, labelled = pick_samples(folder, count, seed)
    loaded = load_split(chosen, config, clean="off", max_pixels=max_pixels)
    if not len(loaded.y):
        raise CtedgeError(f"no readable images in {folder}")
    return loaded.x, loaded.y if labelled else None, f"{len(loaded.y)} images from {folder}"


# --- parity ------------------------------------------------------------------

def engine_probabilities(runtime: str, path: Path, images: np.ndarray, precision: str | None = None,
                         cache_dir: str | None = None, batch: int = 16) -> np.ndarray:
    """The parity gate's run: the file on the engine ``Classifier`` uses (from the
    registry), on the CPU; ``precision`` None runs the file as it is (a variant file at its own)."""
    from ctedge.edge import engines

    config = engines.resolve(path, engines.EngineConfig(runtime=runtime, precision=precision, provider="cpu",
                                                        cache_dir=cache_dir))
    engine = engines.open_engine(path, config)
    return np.concatenate([engine.run(np.ascontiguousarray(images[i:i + batch], np.float32))
                           for i in range(0, len(images), batch)])


def parity(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None,
           threshold: float) -> dict:
    """max |Δp|, decision agreement (``core.metrics.agreement``) and (labelled) AUC of both."""
    from ctedge.core.metrics import agreement, output_spread, point_metrics

    report = {**agreement(reference, candidate, threshold), "reference_spread": output_spread(reference)}
    if labels is not None and 0 < labels.sum() < len(labels):
        report["auc_keras"] = point_metrics(labels, reference, threshold)["auc"]
        report["auc"] = point_metrics(labels, candidate, threshold)["auc"]
        report["auc_change"] = report["auc"] - report["auc_keras"]
    return report


# --- variants ----------------------------------------------------------------

def _unshare_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Give each consumer of a shared initializer its own copy: tf2onnx shares
    equal constants, and onnxconverter-common leaves a constant in float32 for
    every node once one consumer (e.g. Min/Max) must keep it so."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    initializers = {i.name: i for i in proto.graph.initializer}
    seen: set[str] = set()
    for node in proto.graph.node:
        for k, name in enumerate(node.input):
            if name not in initializers:
                continue
            if name in seen:
                copy = proto.graph.initializer.add()
                copy.CopyFrom(initializers[name])
                copy.name = f"{name}__{node.name}_{k}"
                node.input[k] = copy.name
            seen.add(name)
    return proto


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and compute in float16, float32 input and output kept."""
    import warnings

    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "number truncated to 1e-07", per weight
        return float16.convert_float_to_float16(_unshare_initializers(proto), keep_io_types=True)


def to_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray, options: ExportOptions) -> None:
    """Static quantisation (pre-processed; QDQ, per-channel, Conv/Gemm/MatMul by default)."""
    from ctedge.edge.engines.onnxruntime import quantize_int8

    quantize_int8(fp32_path, out_path, calibration, input_name=INPUT_NAME, per_channel=options.int8_per_channel,
                  reduce_range=options.int8_reduce_range, op_types=options.int8_ops,
                  qoperator=options.int8_format == "qoperator")


def latest_model(tuning_dir: Path = Path("tuning"), runs_dir: Path = Path("runs")) -> Path:
    """The best model of the most recent tuning project, else the newest trained run."""
    candidates = sorted(tuning_dir.glob("*/best_model.keras"), key=lambda p: p.stat().st_mtime)
    candidates = candidates or sorted(runs_dir.glob("*/model.keras"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CtedgeError(f"no model given and none found in {tuning_dir}/*/best_model.keras "
                          f"or {runs_dir}/*/model.keras; pass MODEL.keras")
    return candidates[-1]


def default_output(model_path: Path, exports_dir: Path = Path("exports")) -> Path:
    name = model_path.parent.name if model_path.stem in ("model", "best_model") else model_path.stem
    return exports_dir / f"{name}.onnx"


def judge(probabilities: np.ndarray, check: dict, tolerance: float, options: ExportOptions, what: str,
          engine: str, refuse_to: Path | None = None) -> dict:
    """Parity report with its verdict; with ``refuse_to`` a failure raises (the gate)."""
    report = parity(check["reference"], probabilities, check["labels"], options.threshold)
    report.update(tolerance=tolerance, check_data=check["source"])
    passed = report["max_abs_diff"] <= tolerance and report["decision_agreement"] == 1.0
    report["status"] = "ok" if passed else "flagged"
    if refuse_to is not None and not passed:
        raise CheckFailed(
            f"{what} failed on {check['source']}: max |Keras - {engine}| = "
            f"{report['max_abs_diff']:.3g} (tolerance {tolerance:g}), decision agreement "
            f"{report['decision_agreement']:.3f}; nothing written to {refuse_to}")
    return report


def _dropped(report: dict, options: ExportOptions) -> bool:
    """A flagged variant is dropped unless ``keep_flagged``: marks the report and says so."""
    if report["status"] != "flagged" or options.keep_flagged:
        return False
    report["status"] = "dropped"
    return True


def _drop(path: Path, variant: str, report: dict, *companions: Path) -> dict:
    """The card of a variant beyond its tolerance, which is not written; an older file
    of that name goes, so nothing in the folder answers unlike its source model."""
    for stale in (path, *companions):
        stale.unlink(missing_ok=True)
    return {"file": None, "variant": variant, "size_mb": None, "parity": report}


def _write_card(card: dict, path: Path) -> dict:
    """A variant's model card beside it (NAME.json): strict JSON, an undefined metric as null."""
    save_json(card, path.with_suffix(".json"))
    return card


def _finish_variant(proto: onnx.ModelProto, path: Path, variant: str, tolerance: float,
                    metadata: dict, check: dict, options: ExportOptions, gate: bool = False) -> dict:
    """Check, measure parity against Keras on onnxruntime, then move the file into place
    and write its model card.

    With ``gate`` a parity failure raises and nothing is written; otherwise a
    variant beyond ``tolerance`` is dropped (status "dropped", no file), or written
    with status "flagged" when ``options.keep_flagged``.
    """
    set_metadata(proto, {**metadata, "ctedge.variant": variant})
    check_graph(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as tmp:
        staged = Path(tmp) / path.name
        staged.write_bytes(proto.SerializeToString())
        report = judge(engine_probabilities("onnxruntime", staged, check["images"]), check, tolerance, options,
                       f"{variant} parity check", "ONNX", path if gate else None)
        if _dropped(report, options):
            return _drop(path, variant, report, path.with_suffix(".json"))
        os.replace(staged, path)
    card = {"file": str(path), "variant": variant, "size_mb": path.stat().st_size / 1e6,
            "metadata": {**metadata, "ctedge.variant": variant}, "parity": report,
            "output_spread": check["spread"]}
    return _write_card(card, path)


def export_onnx(model_path: str | Path | None = None, output: str | Path | None = None,
                options: ExportOptions | None = None) -> dict:
    """Export, verify and write fp32 (+ fp16/int8) ONNX files with model cards."""
    from ctedge.training.model import load_model

    options = options or ExportOptions()
    model_path = Path(model_path) if model_path else latest_model()
    output = Path(output) if output else default_output(model_path)
    if (options.int8 or options.openvino) and not options.calibration_data:
        raise CtedgeError(f"{'--int8' if options.int8 else '--openvino'} needs --calibration-data DIR "
                          "(images like those it will see)")
    from ctedge.edge.engines import require, variant_path

    require("onnxruntime")  # the parity gate runs the ONNX file on onnxruntime
    if options.openvino:
        require("openvino")
    model = load_model(model_path)
    preprocess = keras_preprocess_config(model)
    images, labels, source = sample_images(options.check_data, preprocess, options.check_count,
                                            max_pixels=options.max_pixels)
    check = {"images": images, "labels": labels, "source": source,
             "reference": model.predict(images, batch_size=16, verbose=0)[:, 0]}
    check["spread"] = spread = refuse_constant(check["reference"], source, options.allow_constant)
    metadata = build_metadata(model, model_path, options.threshold, "fp32")
    proto = convert(model, options.opset)
    cards = {"fp32": _finish_variant(proto, output, "fp32", options.tolerance, metadata, check,
                                     options, gate=True)}
    if options.fp16:
        cards["fp16"] = _finish_variant(to_fp16(proto), variant_path("onnxruntime", output, "fp16"),
                                        "fp16", options.fp16_tolerance, metadata, check, options)
    if options.int8 or options.openvino:
        calibration, _, calibration_source = sample_images(
            options.calibration_data, preprocess, options.calibration_count, seed=1, max_pixels=options.max_pixels)
    if options.int8:
        with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
            quantized = Path(tmp) / "int8.onnx"
            to_int8(output, quantized, calibration, options)
            cards["int8"] = _finish_variant(onnx.load(quantized),
                                            variant_path("onnxruntime", output, "int8"), "int8",
                                            options.int8_tolerance,
                                            {**metadata, "ctedge.int8_calibration": calibration_source},
                                            check, options)
    if options.openvino:
        cards.update(export_openvino(output, metadata, check, options, calibration, calibration_source))
    return {"model": str(model_path), "output": str(output), "options": asdict(options),
            "output_spread": spread, "variants": cards}


# --- OpenVINO ----------------------------------------------------------------

def _finish_ir(model, path: Path, variant: str, tolerance: float, metadata: dict, check: dict,
               options: ExportOptions, gate: bool = False, extra: dict | None = None) -> dict:
    """The parity gate and model card of ``_finish_variant`` for an OpenVINO IR: saved
    beside ``path``, run on the OpenVINO engine, then renamed into place."""
    from ctedge.edge.engines import openvino as ov_engine

    ov_engine.set_metadata(model, {**metadata, "ctedge.variant": variant})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as tmp:
        staged = ov_engine.save_ir(model, Path(tmp) / path.name)
        report = judge(engine_probabilities("openvino", staged, check["images"], cache_dir=str(Path(tmp) / "cache")),
                       check, tolerance, options, f"OpenVINO {variant} parity check", "OpenVINO",
                       path if gate else None)
        report["runtime"] = "openvino f32"
        if _dropped(report, options):
            return _drop(path, variant, report, path.with_suffix(".bin"), path.with_suffix(".json"))
        os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(staged, path)
    card = {"file": str(path), "variant": variant, "runtime": "openvino",
            "size_mb": (path.stat().st_size + path.with_suffix(".bin").stat().st_size) / 1e6,
            "metadata": {**metadata, "ctedge.variant": variant}, "parity": report, **(extra or {})}
    return _write_card(card, path)


def export_openvino(onnx_path: Path, metadata: dict, check: dict, options: ExportOptions,
                    calibration: np.ndarray, calibration_source: str) -> dict:
    """OpenVINO IR of the verified ONNX file (gated like it), its BF16 inference
    precision checked when the CPU has it, and an NNCF INT8 IR (flagged beyond
    ``int8_tolerance``), each with a model card."""
    from ctedge.edge import engines
    from ctedge.edge.engines import openvino as ov_engine

    cards = {}
    ir_path = engines.variant_path("openvino", onnx_path, "ir")
    bf16 = None
    if "BF16" in ov_engine.capabilities("CPU"):
        with tempfile.TemporaryDirectory() as cache:
            bf16 = judge(engine_probabilities("openvino", onnx_path, check["images"], "bf16", cache), check,
                         options.bf16_tolerance, options, "bf16 parity check", "OpenVINO bf16")
        bf16["runtime"] = "openvino bf16 inference precision of this IR"
    cards["ov-fp32"] = _finish_ir(ov_engine.read_model(onnx_path), ir_path, "fp32", options.ov_tolerance, metadata,
                                  check, options, gate=True, extra={"bf16_parity": bf16} if bf16 else None)
    if bf16:
        cards["ov-bf16"] = {"file": str(ir_path), "variant": "bf16 (run-time precision)",
                            "size_mb": cards["ov-fp32"]["size_mb"], "parity": bf16}
    quantized = ov_engine.quantize_ir(ir_path, calibration, options.ov_int8_ignored_types)
    cards["ov-int8"] = _finish_ir(quantized, engines.variant_path("openvino", onnx_path, "int8"), "int8",
                                  options.int8_tolerance,
                                  {**metadata, "ctedge.int8_calibration": calibration_source}, check, options)
    return cards


def refuse_constant(reference: np.ndarray, source: str, allow: bool) -> dict:
    """The Keras model's output spread on the check images; a constant model is
    refused (exit 3) unless ``allow``: its AUC and labels would rank round-off."""
    from ctedge.core.metrics import constant_message, output_spread

    spread = output_spread(reference)
    message = constant_message(spread, len(reference))
    if message and not allow:
        raise CheckFailed(f"{message} ({source}); nothing exported. Check the training run (or use "
                          "--check-data with real images); --allow-constant exports it anyway")
    return {"value": spread, "images": int(len(reference)), "check_data": source,
            "constant": message is not None}
