"""Training on several processes, on PyTorch's own engine: `torchrun` starts the processes, torch.distributed
joins them (gloo on CPU, NCCL on GPUs), DDP or FSDP2 keeps them in step.

    torchrun --nproc_per_node=2 -m loraforge train data=chats.jsonl            # DDP
    torchrun --nproc_per_node=8 -m loraforge train … distributed.strategy=fsdp  # frozen base sharded

One optimizer step takes `batch_size × grad_accum × world_size` examples: the same examples, in the same order, as
one process with `grad_accum × world_size`. Rank r trains the step's micro-batches r·grad_accum … (r+1)·grad_accum−1,
the loss is divided by the step's count of targets over all ranks, and gradients are summed across ranks (not
averaged), so the update is the one-process update up to fp32 summation order.

- ddp: torch's DistributedDataParallel. Only parameters that require grad are bucketed and all-reduced, so with an
  adapter only its gradients travel; the frozen base is neither broadcast nor reduced (each rank loads it).
- fsdp: FSDP2 `fully_shard` on every decoder layer and on the whole, with the adapter left out of the sharding
  (`ignored_params`): each rank holds 1/world of the frozen weights and all-gathers one layer at a time, while the
  adapter (≪ 1% of the weights) and its optimizer state stay whole on every rank and its gradients are
  all-reduced after backward. Checkpoints, resume on another world size, AdaLoRA's controller and every file
  writer then see plain tensors, as in one process.

Without torchrun (no WORLD_SIZE in the environment) nothing here starts a process group and every helper is the
one-process identity. Everything written to the run folder is written by rank 0; validation rows are shared out
and the figures combined; the comparison after training runs on rank 0 alone.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from loraforge.errors import ConfigError, LoraforgeError

T = TypeVar("T")


# -- who am I ---------------------------------------------------------------------------------------
def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (or anything that sets the env:// rendezvous variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def join(device: torch.device, timeout_s: float) -> torch.device:
    """Join the process group torchrun describes in the environment (no-op without torchrun); returns this rank's
    device: cuda:LOCAL_RANK on GPUs, else `device`. A collective that waits longer than `timeout_s` (a rank died
    or hangs) raises instead of waiting forever."""
    if not launched() or active():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return device


def leave() -> None:
    """Leave the process group once nothing holds its collectives (drop a DDP wrapper first). The barrier waits
    without the GIL, so gloo's threads can free the tensors of the last collectives before the group's destructor
    joins them while holding the GIL; the collection frees a wrapper caught in a reference cycle while the group
    is still alive."""
    if active():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


# -- collectives the loop needs -------------------------------------------------------------------------
def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over the ranks (fp64: step counts and loss sums stay exact)."""
    if not active():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (a stop request that reached one rank stops them all together)."""
    return all_sum([float(flag)])[0] > 0


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank died, hung past the timeout or dropped
    its connection (gloo raises RuntimeErrors naming itself; NCCL and the store raise torch's DistErrors)."""
    return active() and (isinstance(error, dist.DistError) or "gloo" in str(error) or "NCCL" in str(error))


def on_main(fn: Callable[[], str | None]) -> str | None:
    """Run `fn` on rank 0 only and give its result (a string or None) to every rank; an error on rank 0 is raised
    on every rank, with its message, instead of leaving the others waiting."""
    if not active():
        return fn()
    message = [None, None]
    if is_main():
        try:
            message = ["ok", fn()]
        except Exception as error:
            message = [type(error).__name__, str(error)]
            dist.broadcast_object_list(message, src=0)
            raise
    dist.broadcast_object_list(message, src=0)
    if message[0] != "ok":
        raise LoraforgeError(f"rank 0 failed ({message[0]}): {message[1]}")
    return message[1]


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block before the others (a first-use cache conversion happens once, not N times at once)."""
    if active() and not is_main():
        dist.barrier()
    yield
    if active() and is_main():
        dist.barrier()


def all_gather(value: T) -> list[T]:
    """Every rank's `value` (tensors, numbers, strings), in rank order, on every rank."""
    if not active():
        return [value]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def own_block(items: Sequence[T], per_rank: int) -> Sequence[T]:
    """Rank r's `per_rank` consecutive items of a step's global list (its micro-batches, its prompts)."""
    return items[rank() * per_rank : (rank() + 1) * per_rank]


def step_seed(seed: int, step: int) -> None:
    """With several ranks, each step's random draws (dropout) come from (seed, step, rank): the ranks draw
    differently, and a resumed run draws as the uninterrupted one did, whatever RNG state a checkpoint holds."""
    if active():
        torch.manual_seed((seed * 1_000_003 + step) * 4099 + rank())


# -- keeping the ranks' adapters equal ---------------------------------------------------------------------
@dataclass
class DataParallel:
    """The loss module as the ranks run it: `module` (DDP- or FSDP2-wrapped), `no_sync()` for the micro-batches
    before a step's last one, and `reduce_gradients` after the last backward."""

    module: nn.Module
    strategy: str
    trainable: list[nn.Parameter]

    def describe(self) -> str:
        adapter = sum(p.numel() * p.element_size() for p in self.trainable) / 2**20
        if self.strategy == "ddp":
            return (f"ddp over {world_size()} ranks: each holds the whole base; the {adapter:,.1f} MB of trainable "
                    "gradients are summed across ranks once per step")
        mine = whole = 0
        for param in self.module.parameters():
            if not param.requires_grad:
                local = param.to_local() if hasattr(param, "to_local") else param
                mine, whole = mine + local.numel() * local.element_size(), whole + param.numel() * local.element_size()
        return (f"fsdp over {world_size()} ranks: this rank holds {mine / 2**20:,.2f} MB of the {whole / 2**20:,.2f} "
                f"MB of frozen weights (one layer all-gathered at a time); the adapter ({adapter:,.1f} MB) is whole on "
                "every rank, its gradients summed once per step")

    def no_sync(self):
        return self.module.no_sync() if self.strategy == "ddp" else nullcontext()

    def reduce_gradients(self) -> None:
        """fsdp: the adapter's gradients summed over the ranks in one flat all-reduce (DDP did it in backward)."""
        if self.strategy != "fsdp" or world_size() == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for param, grad in zip(self.trainable, grads):
            param.grad = flat[offset : offset + grad.numel()].view_as(param).to(grad.dtype)
            offset += grad.numel()


def _sum_gradients(state, bucket):  # no annotations: DDP checks them, and this module's are strings
    # DDP's default hook averages over the ranks; the loss is already divided by the global count, so the
    # gradient of the global mean is the sum.
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: transformers names their classes in `_no_split_modules` (what
    accelerate's and TRL's FSDP wrap policy uses too)."""
    names = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or ())}
    return [module for module in model.modules() if type(module).__name__ in names]


def wrap(module: nn.Module, strategy: str, trainable: Sequence[nn.Parameter], device: torch.device,
         param_dtype: torch.dtype | None = None) -> DataParallel:
    """`module` (the loss module over the whole model) under DDP or FSDP2 for the current process group."""
    trainable = list(trainable)
    if strategy == "ddp":
        frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
        frozen += [name for name, _ in module.named_buffers()]
        # Every rank loads the same base; only what trains needs to start equal (DDP broadcasts it from rank 0).
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
        ddp = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        ddp.register_comm_hook(None, _sum_gradients)
        return DataParallel(ddp, strategy, trainable)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ignored = set(trainable)
    layers = decoder_layers(module)
    if not layers:
        raise ConfigError(f"distributed.strategy: fsdp shards a model layer by layer, and {type(module.model).__name__} "
                          "names no layer classes (_no_split_modules); use ddp")
    # On GPUs the frozen weights are all-gathered in the compute dtype (half the bytes of fp32); on CPUs autocast
    # decides per op, as in one process.
    policy = MixedPrecisionPolicy(param_dtype=param_dtype if device.type == "cuda" else None)
    for layer in layers:
        fully_shard(layer, mp_policy=policy, ignored_params=ignored)
    fully_shard(module, mp_policy=policy, ignored_params=ignored)
    # Adapters left whole must start equal on every rank (they do: the same seed), made certain from rank 0.
    for param in trainable:
        dist.broadcast(param.data, src=0)
    return DataParallel(module, strategy, trainable)
