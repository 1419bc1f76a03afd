"""TensorFlow-free foundations: errors, choices, files, image I/O, preprocessing, metadata, metrics, data."""
