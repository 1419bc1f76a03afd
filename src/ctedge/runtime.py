"""The documented embedding API: ``from ctedge.runtime import Classifier``.

The runtime lives in ``ctedge.edge.runtime``; this module keeps the public name.
"""

from ctedge.edge.runtime import *  # noqa: F401,F403
from ctedge.edge.runtime import __all__  # noqa: F401
