"""Training, tuning and export: the TensorFlow stack."""
