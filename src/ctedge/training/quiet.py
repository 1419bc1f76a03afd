"""Import TensorFlow without its C++ start-up noise on a user's terminal.

TensorFlow's native libraries log through absl before ``TF_CPP_MIN_LOG_LEVEL``
takes effect ("oneDNN custom operations are on", "Could not find cuda
drivers", "failed call to cuInit"), so the level alone does not silence them.
During the import, file descriptor 2 goes to a temporary file; afterwards every
captured line that is not known start-up noise is written back to stderr.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

from ctedge.core.errors import CtedgeError

NOISE = re.compile(
    r"absl::InitializeLog|oneDNN custom operations|Could not find cuda drivers|cuInit|"
    r"cpu_feature_guard|This TensorFlow binary is optimized|rebuild TensorFlow|"
    r"To enable the following instructions|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"computation_placer|TF-TRT Warning|^\s*$")


def import_tensorflow(verbose: bool = False) -> None:
    """Import tensorflow and keras once; quiet unless ``verbose``. Without
    them (the base, edge install) a CtedgeError names the extra to install."""
    if "tensorflow" in sys.modules:
        return
    import importlib.util

    missing = [m for m in ("tensorflow", "keras") if importlib.util.find_spec(m) is None]
    if missing:
        raise CtedgeError(f"this command needs {' and '.join(missing)}, which the base install "
                          "leaves out: pip install 'ctedge[train]'")
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import keras  # noqa: F401
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")  # CUDA start-up logs here, not mid-training
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().decode(errors="replace").splitlines()
                    if not NOISE.search(line)]
    if kept:
        sys.stderr.write("\n".join(kept) + "\n")
