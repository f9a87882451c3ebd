"""``CheckpointError``, importable from ``int8mm.loading`` as before (it lives in ``int8mm.errors``)."""
from ..errors import CheckpointError

__all__ = ["CheckpointError"]
