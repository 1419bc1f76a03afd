"""The read budgets every reader keeps to (``ctedge --max-pixels``, ``--max-bytes``): their
defaults and their check. No numpy, so the command line can show them without loading it."""

from __future__ import annotations

DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP: far above any CT slice (512x512 to 4096x4096)
DEFAULT_MAX_BYTES = 512 * 2**20  # per zip entry or NIfTI volume, uncompressed; a CT slice is ~0.5 MB


def check_budgets(**budgets: int) -> None:
    """Each read budget (max_pixels, max_bytes) at least 1; CtedgeError naming the one that is not."""
    from ctedge.core.errors import CtedgeError

    for name, value in budgets.items():
        if value < 1:
            raise CtedgeError(f"must be at least 1, not {value}", param=name)
