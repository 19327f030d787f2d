"""Deprecated: ``eventbus.control`` is ``eventbus.ops.control`` now (gone in eventbus 0.3)."""

import sys

from eventbus import _deprecated
from eventbus.ops import control as _module

_deprecated.warn("eventbus.control", "eventbus.ops.control")
sys.modules[__name__] = _module
