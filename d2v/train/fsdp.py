"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for pretraining and fine-tuning, `parallel: fsdp` under torchrun:
parameters, gradients and AdamW states are sharded over the ranks instead of replicated as DDP does.

Each Transformer block (of the student and of the EMA teacher; of a task model's encoder) is its own unit (gathered
for its forward, resharded after), and LayerDrop skips the same blocks on every rank; everything else (local
encoders, norms, the v2 decoder, a task's head) sits in the root unit, gathered for the whole forward. Student and
teacher parameters have the same shapes and placements, so the EMA step runs on the local shards unchanged.
Checkpoints hold the full, unsharded state in the single-process layout (the optimizer indexed by parameter
position), so a run can resume under FSDP, DDP or one process alike. Under bf16 the units gather bf16 parameters and
reduce fp32 gradients.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from d2v.train import optim
from d2v.train.distributed import World, ddp

LAYERDROP_STREAM = 1  # keeps the LayerDrop key apart from the (seed, step, group) key of the masks


def precision_policy(precision: str):
    """Under bf16 the units gather their parameters in bf16 (half the all-gather traffic and unsharded memory) and
    reduce gradients in fp32. Inputs are not cast: autocast picks each op's dtype as it does in one process (where it
    casts the fp32 weights to bf16 at each matmul anyway), so FSDP computes the same forward. fp16 and fp32 gather the
    fp32 parameters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision != "bf16":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard(root: nn.Module, encoders: tuple[nn.Module, ...], world: World, precision: str = "fp32") -> None:
    """Shard `root` in place over all ranks (one mesh dimension), each block of its `encoders` a unit of its own;
    `precision` is resolved (not `auto`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh, policy = init_device_mesh(world.device.type, (world.size,)), precision_policy(precision)
    for encoder in encoders:
        for block in encoder.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)


def parallelize(module: nn.Module, encoders: tuple[nn.Module, ...], parallel: str, world: World, precision: str,
                find_unused: bool) -> tuple[nn.Module, bool]:
    """The module a training step calls, and whether FSDP shards it: one process calls `module` itself; under torchrun
    `parallel: ddp` wraps it in DDP (`find_unused`: parameters a step may leave without a gradient), `fsdp` shards it
    in place (`shard`; its parameters become shards, so the optimizer is built after)."""
    if world.distributed and parallel == "fsdp":
        shard(module, encoders, world, precision)
        return module, True
    return (ddp(module, world.device, find_unused) if world.distributed else module), False


def share_layerdrop(encoder: nn.Module, seed: int, step: int, micro: int) -> None:
    """LayerDrop draws for micro-batch `micro` of `step` from a key without the rank: a block one rank skipped would
    leave the others waiting in its collectives, so every rank skips the same blocks (DDP lets each rank draw its
    own)."""
    key = np.random.SeedSequence([seed, step, micro, LAYERDROP_STREAM]).generate_state(1)[0]
    encoder.layerdrop_generator = torch.Generator().manual_seed(int(key))


def _parameter_names(objective: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The objective's names of the optimizer's parameters, in the order `optimizer.state_dict()` numbers them."""
    names = {id(p): name for name, p in objective.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _rekeyed(optim_state: dict, key) -> dict:
    """An optimizer state dict with each parameter reference `p` replaced by `key[p]`: names ↔ positions."""
    groups = [{**group, "params": [key[p] for p in group["params"]]} for group in optim_state["param_groups"]]
    return {"state": {key[p]: s for p, s in optim_state["state"].items()}, "param_groups": groups}


def full_state(objective: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The unsharded model and optimizer state (a collective: every rank calls it; rank 0 receives the tensors, on
    the CPU), the optimizer's in `optimizer.state_dict()`'s layout."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, optim = get_state_dict(objective, optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not optim:  # the other ranks' share of the gather is empty
        return model, optim
    index = {name: i for i, name in enumerate(_parameter_names(objective, optimizer))}
    return model, _rekeyed(optim, index)


def full_model_state(model: nn.Module) -> dict:
    """The unsharded state dict of a sharded model (a collective: every rank calls it; rank 0 receives the tensors,
    on the CPU): what best.pt and final.pt hold."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_states(module: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool,
                    world: World) -> tuple[dict, dict] | None:
    """The module's and optimizer's full states for a checkpoint on the main rank, None on the others. Every rank
    calls it: under FSDP (`sharded`) they gather the states together."""
    if sharded:
        states = full_state(module, optimizer)
    elif world.is_main:
        states = module.state_dict(), optimizer.state_dict()
    return states if world.is_main else None


def gathered_model_state(module: nn.Module, sharded: bool, world: World) -> dict | None:
    """The module's full state dict on the main rank, None on the others; every rank calls it (FSDP gathers)."""
    if sharded:
        state = full_model_state(module)
    elif world.is_main:
        state = module.state_dict()
    return state if world.is_main else None


def restore_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, saved: dict, sharded: bool) -> None:
    """A checkpoint's optimizer state (the single-process layout) into this run's optimizer: each rank's shards of
    it under FSDP (`sharded`), else as saved (`optim.load_optimizer_state`)."""
    if sharded:
        load_optimizer_state(module, optimizer, saved)
    else:
        optim.load_optimizer_state(optimizer, saved)


def load_optimizer_state(objective: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load an `optimizer.state_dict()`-layout state into the optimizer of the sharded objective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = _rekeyed(saved, _parameter_names(objective, optimizer))
    # not strict: a parameter that never had a gradient (v2's unused mask token) has no AdamW state, as in the layout
    set_optimizer_state_dict(objective, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False))
    # which first gives every parameter a state by a zero-gradient step (step 1, zero moments): drop those the saved
    # state lacks, or the checkpoints after a resume would differ from the uninterrupted run's
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for position, param in enumerate(params):
        if position not in saved["state"]:
            optimizer.state.pop(param, None)


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor reduction result (the gradient norm of sharded gradients) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
