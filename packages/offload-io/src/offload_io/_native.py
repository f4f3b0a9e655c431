"""Import ds-native, or explain what to install."""

from __future__ import annotations

# The ds-native ABI this package was written against (ds_native.ABI_VERSION).
NATIVE_ABI = 1

try:
    import ds_native
except ImportError as exc:
    raise ImportError(
        "offload-io needs the ds-native package (zero-all's compiled kernels), which is not installed. "
        "From a zero-all checkout: `uv pip install ./native` (see the root README)."
    ) from exc

ds_native.check_compatible("offload-io", NATIVE_ABI)

__all__ = ["ds_native"]
