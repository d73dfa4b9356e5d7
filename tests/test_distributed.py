"""Distributed training through PyTorch's own engines: DDP and FSDP2
(``fully_shard``) over 2 processes with the gloo backend give the gradients
of one process on the whole batch; under FSDP2, save_adapter and
load_adapter work on the sharded adapters."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fused_lora

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _model(device, backend="auto"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 8)).to(device)
    fused_lora.inject(model, ["0", "2", "4"], r=4, alpha=8, backend=backend)
    with torch.no_grad():
        for layer in fused_lora.integration.fused_layers(model).values():
            layer.lora_B.normal_(0, 0.3)
    return model


def _data(device):
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 24, generator=g).to(device), torch.randint(0, 8, (12,), generator=g).to(device)


def _grads(model):
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            if hasattr(g, "full_tensor"):  # FSDP2: a sharded DTensor
                g = g.full_tensor()
            out[name.replace("_fsdp_wrapped_module.", "").replace("module.", "")] = g.detach().cpu()
    return out


def _worker(rank, mode, init_file, out_file):
    sys.path.insert(0, os.path.dirname(__file__))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        device = torch.device("cpu")
        model = _model(device, backend="triton")
        x, y = _data(device)
        shard = slice(rank * 6, (rank + 1) * 6)
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            for layer in fused_lora.integration.fused_layers(model).values():
                fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        loss = nn.functional.cross_entropy(wrapped(x[shard]), y[shard])
        loss.backward()
        result = {"grads": _grads(model)}
        if mode == "fsdp2":
            result.update(_save_and_load_sharded(model, os.path.join(os.path.dirname(out_file), "adapter"), mesh))
        if rank == 0:
            torch.save(result, out_file)
        del wrapped
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
    # Success: leave without running C++ static destructors. Gloo's threads
    # sometimes abort there ("terminate called without an active exception",
    # about one run in twenty), after all the work above is done and checked.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _save_and_load_sharded(model, directory, mesh):
    """Under FSDP2, on every rank: save_adapter gathers the shards and rank 0
    writes; load_adapter puts each rank's part back; fusing a sharded linear
    is refused. Returns what the test checks."""
    fused_lora.save_adapter(model, directory)
    written = sorted(os.listdir(directory))  # (every rank: the files exist when save_adapter returns)
    layers = fused_lora.integration.fused_layers(model)
    before = {n: layer.lora_B.full_tensor().clone() for n, layer in layers.items()}
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.zero_()
    fused_lora.load_adapter(model, directory)
    reloaded = {n: layer.lora_B.full_tensor() for n, layer in layers.items()}
    from torch.distributed.fsdp import fully_shard

    plain = fully_shard(nn.Sequential(nn.Linear(8, 8)), mesh=mesh)
    try:
        fused_lora.inject(plain, ["0"])  # (a sharded linear: it must be fused before sharding)
        refusal = ""
    except ValueError as err:
        refusal = str(err)
    return {"written": written, "reloaded_equal": all(torch.equal(reloaded[n], before[n]) for n in before),
            "reloaded_nonzero": all(t.abs().max() > 0 for t in reloaded.values()), "refusal": refusal}


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one(tmp_path, monkeypatch, mode):
    out_file = tmp_path / "grads.pt"
    # gloo on CPU: the workers run the kernels on Triton's interpreter, which
    # must be chosen before they import Triton, so it is in their environment.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mp.start_processes(_worker, args=(mode, str(tmp_path / "init"), str(out_file)), nprocs=WORLD,
                       start_method="spawn", join=True)
    result = torch.load(out_file)
    distributed = result["grads"]
    model = _model(torch.device("cpu"))
    x, y = _data(torch.device("cpu"))
    nn.functional.cross_entropy(model(x), y).backward()  # the mean over 12 = the mean of the two shard means
    single = _grads(model)
    assert set(distributed) == set(single) and len(single) == 6
    for name, g in single.items():
        torch.testing.assert_close(distributed[name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    if mode == "fsdp2":
        # the file holds the whole adapters (those of the unsharded model), in PEFT's keys
        from safetensors.torch import load_file

        assert result["written"] == ["adapter_config.json", "adapter_model.safetensors"]
        saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
        assert len(saved) == 6
        for name, layer in fused_lora.integration.fused_layers(model).items():
            for which in "AB":
                assert torch.equal(saved[f"base_model.model.{name}.lora_{which}.weight"],
                                   getattr(layer, f"lora_{which}").detach())
        assert result["reloaded_equal"] and result["reloaded_nonzero"]
        assert "['0'] are sharded by FSDP2" in result["refusal"], result["refusal"]
