"""The one description of where a result was measured, written into every row, JSON and report."""

from __future__ import annotations

import platform

import torch


def run_metadata(model: torch.nn.Module | None = None, device: torch.device | None = None) -> dict:
    """kvkeep, transformers and torch versions, and the device (its name on CUDA) and dtype of ``model``."""
    import transformers

    from . import __version__

    meta = {
        "kvkeep_version": __version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    if model is not None:
        device = next(model.parameters()).device
        meta["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    if device is not None:
        meta["device"] = str(device)
        meta["device_name"] = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        )
    return meta
