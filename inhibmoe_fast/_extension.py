"""Import of the compiled extension ``inhibmoe_fast._C``.

Importing it registers its operators in ``torch.ops.inhibmoe_fast`` with their
CPU (and, when built, CUDA) kernels. ``AVAILABLE`` is False when the import
failed; ``IMPORT_ERROR`` is then the exception.
"""

from __future__ import annotations

from typing import Optional

try:
    from . import _C  # noqa: F401  (the import registers the operators)
except ImportError as exc:
    AVAILABLE = False
    IMPORT_ERROR: Optional[ImportError] = exc
else:
    AVAILABLE = True
    IMPORT_ERROR = None
