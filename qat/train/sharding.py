"""FSDP through Lightning's own ModelParallelStrategy with torch's FSDP2 (`fully_shard`):
`trainer.strategy=fsdp`. Every decoder layer is one FSDP unit (its latent weights, norms and
the methods' parameters sharded across the data-parallel ranks, gathered for its forward), the
rest of the model (embedding, final norm, lm_head) the root unit. The methods' frozen buffers
(masks, codes, group ids) stay whole on every rank: FSDP shards parameters only.
Runs on GPUs (NCCL) and on CPU processes (gloo), which is how the tests run it.
"""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn


def fsdp_strategy(devices: Any, num_nodes: int) -> ModelParallelStrategy:
    """Pure data parallelism over every process (no tensor parallelism); checkpoints are one
    file with the full weights and optimizer state (rank 0 writes it, so the atomic rename and
    `ckpt_path` resume work as for one process)."""
    if isinstance(devices, int) and devices > 0:
        per_node = devices
    else:  # "auto" / -1: every visible GPU
        per_node = max(torch.cuda.device_count(), 1)
    return ModelParallelStrategy(data_parallel_size=per_node * int(num_nodes), tensor_parallel_size=1,
                                 save_distributed_checkpoint=False)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_model(model: nn.Module, mesh: Any) -> None:
    """fully_shard each decoder layer, then the root (once: Lightning may call configure_model again)."""
    from torch.distributed.fsdp import fully_shard

    from qat.models.arch import decoder_layers

    if is_sharded(model):
        return
    _, layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full(t: Tensor) -> Tensor:
    """The whole tensor of a sharded parameter or gradient (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded weights and buffers on CPU, on rank 0 (a collective; other ranks get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
