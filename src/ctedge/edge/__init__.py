"""The TensorFlow-free edge: inference engines, the runtime, CT studies, benchmarks."""
