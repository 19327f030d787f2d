"""Deprecated: ``eventbus.metrics`` is ``eventbus.ops.metrics`` now (gone in eventbus 0.3)."""

import sys

from eventbus import _deprecated
from eventbus.ops import metrics as _module

_deprecated.warn("eventbus.metrics", "eventbus.ops.metrics")
sys.modules[__name__] = _module
