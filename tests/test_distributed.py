"""Distributed training through PyTorch's own engines: DDP and FSDP2
(``fully_shard``) over 2 processes with the gloo backend give the gradients
of one process on the whole batch."""

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
        grads = _grads(model)
        if rank == 0:
            torch.save(grads, out_file)
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


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one(tmp_path, monkeypatch, mode):
    out_file = tmp_path / "grads.pt"
    # gloo on CPU: the workers run the kernels on Triton's interpreter, which
    # must be chosen before they import Triton, so it is in their environment.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mp.start_processes(_worker, args=(mode, str(tmp_path / "init"), str(out_file)), nprocs=WORLD,
                       start_method="spawn", join=True)
    distributed = torch.load(out_file)
    model = _model(torch.device("cpu"))
    x, y = _data(torch.device("cpu"))
    nn.functional.cross_entropy(model(x), y).backward()  # the mean over 12 = the mean of the two shard means
    single = _grads(model)
    assert set(distributed) == set(single) and len(single) == 6
    for name, g in single.items():
        torch.testing.assert_close(distributed[name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
