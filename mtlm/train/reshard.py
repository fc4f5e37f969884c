"""Moved to mtlm/checkpoint/format.py: the on-disk checkpoint format is read by load_model, evaluation and the
converters as much as by training. This old name stays the very same module, for code written against it."""

import sys

from mtlm.checkpoint import format as _format

sys.modules[__name__] = _format
