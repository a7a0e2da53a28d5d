"""What the frozen model's tensors hold on to in memory."""

from __future__ import annotations

import torch


@torch.no_grad()
def release_checkpoint_mapping(model: torch.nn.Module) -> None:
    """Give every float tensor its own memory instead of a view into transformers' memory map of the checkpoint.

    While one tensor is such a view, every page of the file that was ever read stays resident: after the
    adapted weights are narrowed (base_dtype) or quantized, the embedding and norms would keep the whole fp32
    file in RSS (520 MB for SmolLM2-135M). CPU only: on CUDA the tensors were copied off the file already."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and tensor.device.type == "cpu":
            tensor.data = tensor.data.clone()
