"""The TensorFlow baseline beside the edge engines in `ctedge bench`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctedge.edge.bench import BenchOptions, stats_ms, time_calls
from ctedge.training.quiet import import_tensorflow


def bench_keras(path: Path, options: BenchOptions) -> dict:
    """TensorFlow baseline: ``tf.function`` (not ``model.predict``) per batch."""
    import_tensorflow()  # quiet, and on the edge install a message naming ctedge[train]
    import tensorflow as tf

    from ctedge.training.model import load_model

    model = load_model(path)
    size = int(model.input_shape[1])
    infer = tf.function(lambda x: model(x, training=False))
    rng = np.random.default_rng(0)
    result = {"model": str(path), "format": "keras-tf.function", "provider": "tensorflow-cpu",
              "size_mb": path.stat().st_size / 1e6, "input_size": size, "latency": {}}
    for batch in options.batch_sizes:
        x = tf.constant(rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32))
        samples = time_calls(lambda: infer(x).numpy(), options.warmup, options.runs, options.seconds)
        entry = stats_ms(samples)
        entry["images_per_s"] = batch / np.mean(samples)
        result["latency"][str(batch)] = entry
        result.setdefault("samples_ms", (np.asarray(samples) * 1000).tolist())
    return result
