"""Linear layers on oneDNN-packed weights (CPU, float32), for the passes that batch several streams' rows.

MKL's ``F.linear`` at 2–16 rows is no faster per weight read than at one row on this kind of CPU, while a weight
that oneDNN has laid out for its own kernels is read once for all rows at close to memory speed (the figures, for
the LM head and a server's block projections: docs/batching.md). Results agree with ``F.linear`` to float32 rounding (the kernels sum in another order). A packed weight is a
copy: it takes as much memory again as the weight it packs.

Switch: ``FAR_MESH_DISABLE_COMPAT_FIX=packed_linear`` (the fence of the compat fixes) turns packing off
everywhere; callers then use the modules' own ``F.linear``.
"""

from __future__ import annotations

from typing import Optional

import torch

from services.common.features import feature_enabled

FIX_NAME = "packed_linear"


def enabled() -> bool:
    return (feature_enabled(FIX_NAME) and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packs(dtype: torch.dtype, device_type: str) -> bool:
    """Whether weights of this dtype on this kind of device get packed copies: the one rule, used for the packing
    itself and for the memory a node counts per block."""
    return dtype == torch.float32 and device_type == "cpu" and enabled()


def can_pack(weight: torch.Tensor) -> bool:
    return weight.ndim == 2 and packs(weight.dtype, weight.device.type)


def pack(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """A oneDNN-packed copy of ``weight`` (``[out, in]``), or None where oneDNN cannot serve it."""
    if not can_pack(weight):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for a 2-D float32 ``x`` and the packed ``weight`` (no bias)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class PackedHead:
    """An LM head (``[rows, hidden] -> [rows, vocab]``) on a packed copy of ``module.weight`` when it can be
    packed (float32 on CPU, no bias); otherwise the module itself."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        weight = getattr(module, "weight", None)
        self.packed = (pack(weight) if weight is not None and getattr(module, "bias", None) is None else None)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return self.module(hidden)
        return linear(hidden.reshape(-1, hidden.shape[-1]).float(), self.packed).view(*hidden.shape[:-1], -1)
