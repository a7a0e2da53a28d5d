"""What the frozen model's tensors hold on to in memory."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import torch

MADV_DONTNEED = 4  # linux/mman.h: the pages leave this process's resident set; a file's are read again if touched


@torch.no_grad()
def release_checkpoint_mapping(model: torch.nn.Module) -> None:
    """Give every float tensor its own memory instead of a view into transformers' memory map of the checkpoint.

    While one tensor is such a view, every page of the file that was ever read stays resident: after the
    adapted weights are narrowed (base_dtype) or quantized, the embedding and norms would keep the whole fp32
    file in RSS (520 MB for SmolLM2-135M). CPU only: on CUDA the tensors were copied off the file already."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and tensor.device.type == "cpu":
            tensor.data = tensor.data.clone()


@torch.no_grad()
def narrow_in_place(weight: torch.Tensor, dtype: torch.dtype) -> int:
    """Store `weight` in `dtype`, keeping the tensor (a Parameter stays the module's, with its hooks and ties):
    its data is replaced by the narrowed copy. Returns the bytes saved.

    Where the old data was a view into a memory-mapped safetensors checkpoint (transformers loads an fp32 file so
    on a CPU), its pages leave the resident set as soon as it is copied: else every page read while narrowing stays
    resident until the last view is gone, and set-up held the whole fp32 file beside the narrowed copies (SmolLM2:
    611 MB of file pages at its peak)."""
    saved = weight.numel() * (weight.element_size() - torch.finfo(dtype).bits // 8)
    wide = weight.data
    weight.data = wide.to(dtype)
    forget_checkpoint_pages(wide)
    return saved


def forget_checkpoint_pages(unused: torch.Tensor) -> int:
    """Drop from this process's resident set the pages of `unused` — a tensor whose data the caller no longer
    needs — where it is a view into a mapped `.safetensors` file (Linux; elsewhere nothing). torch maps a checkpoint
    private and writable, so a page someone wrote to would go back to the file's bytes: hence only whole pages of
    `unused` itself; pages nobody wrote are read back from the file if touched again. Returns the bytes advised."""
    if unused.device.type != "cpu":
        return 0
    start, length = unused.data_ptr(), unused.numel() * unused.element_size()
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    page, dropped = mmap.PAGESIZE, 0
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].endswith(".safetensors"):
            continue
        low, high = (int(bound, 16) for bound in fields[0].split("-"))
        first, last = max(low, -(-start // page) * page), min(high, (start + length) // page * page)
        if first < last:
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)
            dropped += last - first
    return dropped


def frozen_embedding_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The frozen float weights of the input embedding and the output head, each once (a tied head shares the
    embedding's), where the module is the plain torch one: a wrapped module (LoRA on it, modules_to_save) or a
    trained one keeps its weights as they are, and so does a head with a bias."""
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    weights: list[torch.nn.Parameter] = []
    for module, kind in zip(modules, (torch.nn.Embedding, torch.nn.Linear)):
        if type(module) is not kind or getattr(module, "bias", None) is not None:
            continue
        weight = module.weight
        if weight.is_floating_point() and not weight.requires_grad and all(weight is not w for w in weights):
            weights.append(weight)
    return weights


@torch.no_grad()
def store_embeddings_in(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Keep the frozen input embedding and output head (frozen_embedding_weights) in `dtype`, the dtype the run
    computes in: the head's matmul casts its weight to it anyway, and the embedding's rows are widened back as they
    are looked up, so the residual stream keeps its dtype. For SmolLM2-135M (49k × 576, tied) 56 MB less resident,
    and no cast of the head per step; for an untied 128k-vocabulary 8B model 2 GB. Returns the bytes saved."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    saved = 0
    for weight in frozen_embedding_weights(model):
        if weight.dtype == dtype:
            continue
        wide = weight.dtype
        saved += narrow_in_place(weight, dtype)
        if getattr(embedding, "weight", None) is weight:
            embedding.register_forward_hook(lambda module, args, rows, wide=wide: rows.to(wide))
        if getattr(head, "weight", None) is weight:
            # Outside autocast (a caller computing in fp32) the input meets the narrow weight: compute in its dtype.
            head.register_forward_pre_hook(lambda module, args: (args[0].to(module.weight.dtype), *args[1:]))
    return saved
