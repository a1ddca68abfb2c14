"""FSDP2 (`train.sharding: fsdp`): the student, its projectors and, when asked, the teacher
sharded over all processes with torch's `fully_shard`.

    shard(model, device)          each decoder layer, then the rest of the model, as FSDP units
    gradient_sync_off(acc, m)     no gradient communication on a micro-batch that is not the last
    gathered(model)               every unit's full weights in this process (on-policy sampling)
    full_state(acc, module)       the whole state dict (gathered; main process saves it)
    load_full_state(module, ...)  a whole state dict into the shards
    optimizer_state / shard_optimizer_state
                                  the optimizer's state, whole, in the one-process format

The loss terms and the loop do not know whether a model is sharded: a unit's weights are
gathered in its forward and freed after it; the root unit (embeddings, final norm, lm_head)
stays gathered from its forward until its backward, so the fused loss reads the lm_head
weight as with an unsharded model, and its gradient is reduce-scattered with the rest. A
sharded teacher (no backward) keeps its root gathered: each process holds the teacher's
decoder layers 1/N and its embeddings and lm_head whole. FSDP averages gradients over
processes as DDP does, so the step's loss scaling is the same for both. Checkpoints hold
whole tensors, in the format of a one-process run (gathered to the main process to save;
each process reads the files and keeps its shard on resume).
"""

import contextlib

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from distill.errors import DistillError
from distill.paths import atomic_write_json, read_json


def wanted(cfg, acc) -> bool:
    """Whether this run shards: train.sharding fsdp and more than one process."""
    return cfg.train.sharding == "fsdp" and acc.num_processes > 1


def is_sharded(module) -> bool:
    return isinstance(module, FSDPModule)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the classes transformers never splits across devices."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model: torch.nn.Module, device: torch.device, world: int, units: str = "layers") -> torch.nn.Module:
    """fully_shard `model` in place over `world` processes. units="layers": each decoder
    layer is a unit (a transformers model, which must declare its layers); "whole": one unit
    (the projectors). Returns the model, now also an FSDPModule."""
    model.to(device)
    mesh = init_device_mesh(device.type, (world,))
    if units == "layers":
        layers = decoder_layers(model)
        if not layers:
            raise DistillError(f"train.sharding=fsdp: {type(model).__name__} declares no decoder layer class (_no_split_modules)")
        for layer in layers:
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def gradient_sync_off(acc, model):
    """Gradients of this block's backward stay local (accumulated, unsharded for FSDP) until
    a backward outside it: no communication on the micro-batches before the last."""
    if not is_sharded(model):
        with acc.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def gathered(model):
    """Every FSDP unit of `model` whole in this process for the block (one all-gather each,
    none in the forwards inside): each process can then run forwards of its own number and
    length, as sampling does. Sharded again after. A plain model: nothing to do."""
    if not is_sharded(model):
        yield model
        return
    inner = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    model.unshard()  # the root unit stays gathered after its forwards anyway
    for unit in inner:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for unit in inner:
            unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()
        model.reshard()


def name_plain_class(config_json, model) -> None:
    """save_pretrained of a sharded model records its FSDP subclass (`FSDPLlamaForCausalLM`)
    as the architecture; put the model's own class back, so the folder loads as any other."""
    config = read_json(config_json, "model config")
    own = next(c.__name__ for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    config["architectures"] = [own]
    atomic_write_json(config_json, config)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every process calls it), on the CPU."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().contiguous().cpu()


def aliases(module: torch.nn.Module) -> set[str]:
    """State dict keys that repeat another entry's tensor (a tied lm_head): the same on every
    process, unlike storage pointers of shards."""
    owned = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    return {k for k in module.state_dict() if k not in owned}


def full_state(acc, module) -> dict[str, torch.Tensor]:
    """The module's whole state dict on every process, tied repeats left out (a collective
    for a sharded module); `acc.get_state_dict` for a plain or DDP one."""
    if not is_sharded(module):
        return acc.get_state_dict(module)
    skip = aliases(module)
    return {k: _whole(v) for k, v in module.state_dict().items() if k not in skip}


def _shard_of(value: torch.Tensor, like: DTensor) -> DTensor:
    """The whole tensor `value` as a DTensor laid out as `like` (no communication: every
    process holds the whole value and keeps its own shard)."""
    value = value.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)


def load_full_state(module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy a whole state dict into a sharded module. Returns (missing, unexpected) keys, tied
    repeats not counted as missing; a shape that does not fit raises ValueError."""
    skip = aliases(module)
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state and k not in skip)
    unexpected = sorted(k for k in state if k not in own)
    with torch.no_grad():
        for key, target in own.items():
            if key in skip or key not in state:
                continue
            if tuple(state[key].shape) != tuple(target.shape):
                raise ValueError(f"{key}: shape {tuple(state[key].shape)} does not fit {tuple(target.shape)}")
            local = target.to_local() if isinstance(target, DTensor) else target
            local.copy_(_shard_of(state[key], target).to_local() if isinstance(target, DTensor) else state[key])
    return missing, unexpected


def optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with every sharded state tensor whole (a collective when any is
    sharded: every process calls it, in the same order)."""
    sd = optimizer.state_dict()
    state = {idx: {name: _whole(v) if isinstance(v, DTensor) else v for name, v in sorted(entry.items())}
             for idx, entry in sorted(sd["state"].items())}  # fmt: skip
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state(optimizer, state: dict[int, dict]) -> dict[int, dict]:
    """Whole state tensors cut to the shards of their (sharded) parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {}
    for idx, entry in state.items():
        p = params[idx] if 0 <= idx < len(params) else None
        out[idx] = {
            name: _shard_of(v, p) if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape else v
            for name, v in entry.items()
        }
    return out


def clip_grad_norm(acc, params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the gradients' global norm to max_norm; returns the norm before clipping."""
    if not any(isinstance(p, DTensor) for p in params):
        return acc.clip_grad_norm_(params, max_norm).item()
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return (total.full_tensor() if isinstance(total, DTensor) else total).item()
