"""Distributed training through PyTorch's own engines: DDP, FSDP1
(``FullyShardedDataParallel``) and FSDP2 (``fully_shard``) over 2 processes
with the gloo backend give the gradients of one process on the whole batch;
under FSDP1 and FSDP2, save_adapter and load_adapter work on the sharded
adapters, and what would leave the model running on shards is refused; a
PeftModel converted by from_peft trains and saves under FSDP2 as PEFT's own;
a model of several adapters a layer (inject_multi) trains under DDP, FSDP1
and FSDP2, and saves one adapter and loads it back under both FSDPs."""

import functools
import gc
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fused_lora
from fused_lora.testing import assert_close

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _model(device, backend="auto", quantize_base=False):
    """A small network, fused (``quantize_base``: inject's; ``"torchao"``: its
    linears quantized by torchao's int8 weight-only config first, fused as
    they are, torchao's modules kept aside for unload)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 8)).to(device)
    if quantize_base == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
        quantize_base = False
    fused_lora.inject(model, ["0", "2", "4"], r=4, alpha=8, backend=backend, quantize_base=quantize_base)
    with torch.no_grad():
        for layer in fused_lora.integration.fused_layers(model).values():
            layer.lora_B.normal_(0, 0.3)
    return model


#: The ids of _data's 12 rows for _multi_model (a row each).
MULTI_IDS = [0, 1, -1, 1, 0, 1, 1, -1, 0, 0, 1, 1]


def _multi_model(device, backend="auto"):
    """``_model``'s network with two adapters a layer (inject_multi), ranks 4 and 2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 8)).to(device)
    fused_lora.inject_multi(model, ["0", "2", "4"], ranks=[4, 2], alphas=[8, 2], backend=backend)
    with torch.no_grad():
        for layer in fused_lora.integration.multi_fused_layers(model).values():
            for b in layer.lora_B:
                b.normal_(0, 0.3)
    return model


def _multi_step(model, wrapped, x, y, ids):
    with fused_lora.adapter_ids(model, ids):
        nn.functional.cross_entropy(wrapped(x), y).backward()


def _peft_model(device, use_dora=False):
    """``_model``'s network as a PeftModel of the same adapters (PEFT's names;
    DoRA's, their magnitudes off the norms, with ``use_dora``)."""
    import peft

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 8)).to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4"],
                                                       use_dora=use_dora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand(p.shape) + 0.5)
    return model


def _data(device):
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 24, generator=g).to(device), torch.randint(0, 8, (12,), generator=g).to(device)


def _plain_name(name):
    """``name`` without the wrappers' attributes (DDP's, FSDP1's)."""
    return ".".join(p for p in name.split(".") if p not in ("module", "_fsdp_wrapped_module"))


def _grads(model, wrapped=None):
    if wrapped is not None:  # FSDP1: each rank holds a flat piece of each gradient; the whole ones, gathered
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
            return _grads(model)
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            if hasattr(g, "full_tensor"):  # FSDP2: a sharded DTensor
                g = g.full_tensor()
            out[_plain_name(name)] = g.detach().cpu().clone()
    return out


def _adapters(model, wrapped=None):
    """The fused layers' whole lora_B, by name (FSDP1: gathered through ``wrapped``)."""
    if wrapped is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(wrapped):
            return _adapters(model)
    out = {}
    for n, layer in fused_lora.integration.fused_layers(model).items():
        b = layer.lora_B
        out[_plain_name(n)] = (b.full_tensor() if hasattr(b, "full_tensor") else b).clone()
    return out


def _fsdp2_averages(mesh, rank) -> bool:
    """Whether this torch's FSDP2 averages the ranks' gradients over gloo, as
    it does over NCCL: on a plain nn.Linear, rank i's gradient is all i + 1,
    the mean 1.5. (torch 2.8's sums them to 3: pytorch/pytorch#162338.)"""
    from torch.distributed.fsdp import fully_shard

    plain = fully_shard(nn.Linear(2, 2, bias=False), mesh=mesh)
    plain(torch.full((1, 2), float(rank + 1))).sum().backward()
    return bool((plain.weight.grad.full_tensor() == 1.5).all())


def _fsdp2_refuses_integer_parameters(mesh) -> str:
    """Why this torch's FSDP2 cannot shard a frozen integer parameter ('' where
    it can): a plain module's, an int8 ``nn.Parameter(requires_grad=False)``.
    torch 2.11 makes the sharded parameter with requires_grad left at True,
    which an integer tensor refuses (pytorch/pytorch#177844; 2.13 passes the
    parameter's own)."""
    from torch.distributed.fsdp import fully_shard

    module = nn.Module()
    module.weight = nn.Parameter(torch.zeros(4, 2, dtype=torch.int8), requires_grad=False)
    try:
        fully_shard(module, mesh=mesh)
    except RuntimeError as exc:
        if "can require gradients" not in str(exc):  # (only that bug skips; anything else fails the test)
            raise
        return str(exc)
    return ""


def _worker(rank, mode, init_file, out_file):
    sys.path.insert(0, os.path.dirname(__file__))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        device = torch.device("cpu")
        if mode.startswith("fsdp2-from_peft"):  # (a PeftModel whose layers from_peft fused, then sharded)
            model = _peft_model(device, use_dora=mode.endswith("-dora"))
            fused_lora.from_peft(model)
        elif mode.endswith("-multi"):
            model = _multi_model(device, backend="triton")
        else:  # (fsdp2-int8, fsdp2-nf4, fsdp2-fp4: the layers' bases quantized, sharded as the rest)
            model = _model(device, backend="triton", quantize_base=QUANTIZED_MODES.get(mode, False))
        x, y = _data(device)
        shard = slice(rank * 6, (rank + 1) * 6)
        if mode in ("ddp", "ddp-multi"):
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
        elif mode in ("fsdp1", "fsdp1-multi"):
            from torch.distributed.fsdp import FullyShardedDataParallel
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            # (each fused layer a unit of its own, the model the root; use_orig_params: FSDP1 flattens only
            # parameters that all train or all are frozen otherwise, and a fused layer holds both)
            wrapped = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy(
                {fused_lora.LoRALinear, fused_lora.MultiLoRALinear}), use_orig_params=True, device_id=device)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            refused = _fsdp2_refuses_integer_parameters(mesh) if mode in QUANTIZED_MODES else ""
            if refused:  # (torch's own FSDP2 cannot shard a frozen int8/uint8 parameter: nothing of ours to check)
                wrapped, result = None, {"torch_refuses_integer_parameters": refused}
            elif _fsdp2_averages(mesh, rank):
                # (the base weights as they were before sharding: nothing may keep them whole after it)
                whole = [weakref.ref(layer.weight.untyped_storage())  # (the bytes, whoever holds them)
                         for layer in fused_lora.integration.all_fused_layers(model).values()]
                for layer in fused_lora.integration.all_fused_layers(model).values():
                    fully_shard(layer, mesh=mesh)
                wrapped = fully_shard(model, mesh=mesh)
                gc.collect()
                whole_bases_alive = sum(ref() is not None for ref in whole)
            else:  # (torch's own reduction is wrong: nothing of ours to check)
                wrapped, result = None, {"torch_sums_fsdp2_gradients": True}
        if wrapped is not None and mode.endswith("-multi"):
            _multi_step(model, wrapped, x[shard], y[shard], torch.tensor(MULTI_IDS[shard]))
            result = {"grads": _grads(model, wrapped if mode == "fsdp1-multi" else None)}
            if mode != "ddp-multi":
                result.update(_save_and_load_one_adapter(model, wrapped if mode == "fsdp1-multi" else None,
                                                         os.path.join(os.path.dirname(out_file), "adapter")))
        elif wrapped is not None:
            loss = nn.functional.cross_entropy(wrapped(x[shard]), y[shard])
            loss.backward()
            result = {"grads": _grads(model, wrapped if mode == "fsdp1" else None)}
            if mode.startswith("fsdp2-from_peft"):
                directory = os.path.join(os.path.dirname(out_file), "adapter")
                fused_lora.save_adapter(model, directory)
                result["written"] = sorted(os.listdir(directory))
                result["fused"] = {n: type(m.lora_B).__name__ for n, m in fused_lora.integration.fused_layers(
                    model).items()}
            elif mode != "ddp":
                directory = os.path.join(os.path.dirname(out_file), "adapter")
                result.update(_save_and_load_sharded(model, wrapped if mode == "fsdp1" else model, directory, mode))
                result["bases"] = sorted({(type(layer.weight).__name__, str(layer.weight.dtype))
                                          for layer in fused_lora.integration.fused_layers(model).values()})
                result["formats"] = sorted({fused_lora.quant.base_format(layer.weight, layer.weight_code)
                                            for layer in fused_lora.integration.fused_layers(model).values()})
        if wrapped is not None and mode.startswith("fsdp2"):
            result["whole_bases_alive"] = whole_bases_alive
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


def _save_and_load_one_adapter(model, wrapped, directory):
    """Under FSDP1 (``wrapped``, its wrapper) and FSDP2, on every rank:
    save_adapter(adapter=1) gathers adapter 1's shards and rank 0 writes;
    load_adapter(adapter=1) puts each rank's part back into adapter 1 alone."""
    target = wrapped if wrapped is not None else model
    layers = fused_lora.integration.multi_fused_layers(model)

    def whole(i):
        if wrapped is not None:
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(wrapped):
                return {n: layer.lora_B[i].detach().clone() for n, layer in layers.items()}
        return {n: layer.lora_B[i].full_tensor().clone() for n, layer in layers.items()}

    try:  # (a combination reads whole tensors: refused on shards, before any collective)
        fused_lora.save_adapter(target, directory + "-blend", adapter=[0, 1], weights=[1.0, 0.5])
        combination = ""
    except ValueError as err:
        combination = str(err)
    fused_lora.save_adapter(target, directory, adapter=1)
    written = sorted(os.listdir(directory))
    before, other = whole(1), whole(0)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B[1].zero_()  # (each rank its part)
    fused_lora.load_adapter(target, directory, adapter=1)
    return {"written": written, "reloaded_equal": all(torch.equal(whole(1)[n], before[n]) for n in before),
            "other_untouched": all(torch.equal(whole(0)[n], other[n]) for n in other), "combination": combination,
            "sharded": sorted({type(p).__name__ for layer in layers.values() for p in layer.parameters()})}


def _save_and_load_sharded(model, target, directory, mode):
    """Under FSDP1 and FSDP2, on every rank: save_adapter (called with
    ``target``: the FSDP1 wrapper, or the model FSDP2 sharded in place)
    gathers the shards and rank 0 writes; load_adapter puts each rank's part
    back; fusing a sharded linear and unloading a sharded layer are refused,
    changing nothing. Returns what the test checks."""
    wrapped = target if mode == "fsdp1" else None
    summoned = []
    if mode == "fsdp1":  # (which FSDP1 units save_adapter makes whole, and how: one at a time, itself alone)
        from torch.distributed.fsdp import FullyShardedDataParallel

        summon = FullyShardedDataParallel.summon_full_params

        def recording(module, *args, **kwargs):
            summoned.append((type(module.module).__name__, kwargs.get("recurse", True)))
            return summon(module, *args, **kwargs)

        FullyShardedDataParallel.summon_full_params = recording
        try:
            fused_lora.save_adapter(target, directory)
        finally:
            FullyShardedDataParallel.summon_full_params = summon
    else:
        fused_lora.save_adapter(target, directory)
    written = sorted(os.listdir(directory))  # (every rank: the files exist when save_adapter returns)
    pushed = [None] * dist.get_world_size()  # (push_adapter on every rank: what each returned and uploaded)
    dist.all_gather_object(pushed, _push_to_a_stand_in(target))
    before = _adapters(model, wrapped)
    with torch.no_grad():
        for layer in fused_lora.integration.fused_layers(model).values():
            layer.lora_B.zero_()  # (each rank its part)
    zeroed = _adapters(model, wrapped)
    fused_lora.load_adapter(target, directory)
    reloaded = _adapters(model, wrapped)
    refusals = {}
    for what, call in (("merge_and_unload", lambda: fused_lora.merge_and_unload(target)),
                       ("unload", lambda: fused_lora.unload(target)),
                       ("to_peft", lambda: fused_lora.to_peft(target))):
        try:
            call()
            refusals[what] = ""
        except ValueError as err:
            refusals[what] = str(err)
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        # the model inside the wrapper holds the layers' own FSDP1 units: save_adapter gathers them from it
        fused_lora.save_adapter(model, directory + "-inner")
        # a model wrapped whole from outside: its parameters cannot be gathered from the model inside
        outside = _model(torch.device("cpu"), backend="triton")
        wrappers = [FullyShardedDataParallel(outside, use_orig_params=True, device_id=torch.device("cpu"))]
        try:
            fused_lora.save_adapter(outside, directory + "-outside")
            refusals["save_adapter outside"] = ""
        except ValueError as err:
            refusals["save_adapter outside"] = str(err)
        plain = nn.Sequential(nn.Linear(8, 8))
        wrappers.append(FullyShardedDataParallel(plain, use_orig_params=True, device_id=torch.device("cpu")))
    else:
        from torch.distributed.fsdp import fully_shard

        mesh = next(p for p in model.parameters() if hasattr(p, "device_mesh")).device_mesh
        plain = fully_shard(nn.Sequential(nn.Linear(8, 8)), mesh=mesh)
    try:
        fused_lora.inject(plain, ["0"])  # (a sharded linear: it must be fused before sharding)
        refusals["inject"] = ""
    except ValueError as err:
        refusals["inject"] = str(err)
    if mode == "fsdp2":  # (DTensors outside FSDP2: tensor parallelism, whose styles take nn.Linear only)
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        parallel = parallelize_module(nn.Sequential(nn.Linear(8, 8)), mesh, {"0": ColwiseParallel()})
        try:
            fused_lora.inject(parallel, ["0"])
            refusals["inject tensor parallel"] = ""
        except ValueError as err:
            refusals["inject tensor parallel"] = str(err)
    return {"written": written, "reloaded_equal": all(torch.equal(reloaded[n], before[n]) for n in before),
            "zeroed": all(t.abs().max() == 0 for t in zeroed.values()),
            "reloaded_nonzero": all(t.abs().max() > 0 for t in reloaded.values()), "refusals": refusals,
            "summoned": summoned, "pushed": pushed,
            "still_fused": sorted(map(_plain_name, fused_lora.integration.fused_layers(model)))}


def _push_to_a_stand_in(target) -> dict:
    """push_adapter with huggingface_hub's HfApi replaced by a stand-in that
    records the files of each upload (no network): what this rank returned
    and uploaded."""
    import huggingface_hub

    uploads = []

    class Api:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            uploads.append({n: open(os.path.join(folder_path, n), "rb").read() for n in os.listdir(folder_path)})
            return "commit"

    real, huggingface_hub.HfApi = huggingface_hub.HfApi, Api
    try:
        returned = fused_lora.push_adapter(target, "org/sharded")
    finally:
        huggingface_hub.HfApi = real
    return {"returned": returned, "uploads": uploads}


#: A kernel whose K loop runs to a computed bound: the interpreter converts it
#: with ``int()``, which Triton 3.6's interpreter cannot do under numpy 2.4.
_INTERPRETER_PROBE = """
import torch, triton, triton.language as tl

@triton.jit
def count(out, n, BLOCK: tl.constexpr):
    total = tl.zeros((BLOCK,), tl.float32)
    for _ in range(0, n * 1, BLOCK):
        total += 1.0
    tl.store(out + tl.arange(0, BLOCK), total)

out = torch.empty(4)
count[(1,)](out, 8, BLOCK=4)
assert out.tolist() == [2.0] * 4, out
"""


@functools.lru_cache(maxsize=None)
def _interpreter_fails() -> str:
    """Why Triton's interpreter cannot run a kernel in a fresh process here
    ('' where it can). Asked only with a GPU: without one the whole suite
    runs on the interpreter. (Our GPU machine's Triton 3.6 interpreter fails
    under its numpy 2.4: ``int()`` of a one-element array.)"""
    if not torch.cuda.is_available():
        return ""
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_PROBE], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return ""
    import numpy
    import triton

    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return f"Triton {triton.__version__}'s interpreter fails here (numpy {numpy.__version__}): {last}"


#: The modes whose layers' bases are quantized, and how (inject's quantize_base).
QUANTIZED_MODES = {"fsdp2-int8": True, "fsdp2-nf4": "nf4", "fsdp2-fp4": "fp4", "fsdp2-torchao": "torchao"}


@pytest.mark.parametrize("mode", ["ddp", "fsdp1", "fsdp2", "fsdp2-int8", "fsdp2-nf4", "fsdp2-fp4", "fsdp2-torchao",
                                  "fsdp2-from_peft",
                                  "fsdp2-from_peft-dora",
                                  "ddp-multi", "fsdp1-multi", "fsdp2-multi"])
def test_two_processes_match_one(tmp_path, monkeypatch, mode):
    if _interpreter_fails():
        pytest.skip(f"the workers run gloo on CPU tensors, through Triton's interpreter: {_interpreter_fails()}")
    if mode == "fsdp2-torchao":
        pytest.importorskip("torchao.quantization")
    out_file = tmp_path / "grads.pt"
    # gloo on CPU: the workers run the kernels on Triton's interpreter, which
    # must be chosen before they import Triton, so it is in their environment.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mp.start_processes(_worker, args=(mode, str(tmp_path / "init"), str(out_file)), nprocs=WORLD,
                       start_method="spawn", join=True)
    result = torch.load(out_file)
    if result.get("torch_refuses_integer_parameters"):
        pytest.skip(f"torch {torch.__version__}'s FSDP2 cannot shard a frozen integer parameter, a plain module's "
                    f"too ({result['torch_refuses_integer_parameters']}: pytorch/pytorch#177844)")
    if result.get("torch_sums_fsdp2_gradients"):
        pytest.skip(f"torch {torch.__version__}'s FSDP2 sums the ranks' gradients over gloo instead of averaging "
                    "them, a plain nn.Linear's too (pytorch/pytorch#162338)")
    distributed = result["grads"]
    if mode.startswith("fsdp2"):  # (sharded in memory: no base weight kept whole, PEFT's layers kept aside included)
        assert result["whole_bases_alive"] == 0, result["whole_bases_alive"]
    if mode.startswith("fsdp2-from_peft"):
        _check_from_peft(result, tmp_path, use_dora=mode.endswith("-dora"))
        return
    if mode.endswith("-multi"):
        _check_multi(result, tmp_path, sharded={"fsdp1-multi": "Parameter", "fsdp2-multi": "DTensor"}.get(mode))
        return
    model = _model(torch.device("cpu"), quantize_base=QUANTIZED_MODES.get(mode, False))
    x, y = _data(torch.device("cpu"))
    nn.functional.cross_entropy(model(x), y).backward()  # the mean over 12 = the mean of the two shard means
    single = _grads(model)
    assert set(distributed) == set(single) and len(single) == 6
    for name, g in single.items():
        assert_close(distributed[name], g.double(), torch.float32, name)
    if mode == "ddp":
        return
    # the file holds the whole adapters (those of the unsharded model), in PEFT's keys
    from safetensors.torch import load_file

    saved = _check_saved(result, tmp_path, fused_lora.integration.fused_layers(model), lambda t: t)
    assert result["zeroed"] and result["reloaded_equal"] and result["reloaded_nonzero"]
    # push_adapter on every rank: the shards gathered as save_adapter's, rank 0 uploads those files, rank 1 nothing
    files = {f: (tmp_path / "adapter" / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}
    assert result["pushed"] == [{"returned": "commit", "uploads": [files]}, {"returned": None, "uploads": []}]
    by = "FSDP1 (FullyShardedDataParallel)" if mode == "fsdp1" else "FSDP2 (fully_shard)"
    quantized = {"fsdp2-int8": "torch.int8", "fsdp2-nf4": "torch.uint8", "fsdp2-fp4": "torch.uint8",
                 "fsdp2-torchao": "torch.int8"}.get(mode)
    assert result["bases"] == [("DTensor", quantized)] if quantized else \
        all(dtype == "torch.float32" for _, dtype in result["bases"]), result["bases"]
    assert result["formats"] == [{"fsdp2-int8": "int8", "fsdp2-nf4": "nf4", "fsdp2-fp4": "fp4",
                                  "fsdp2-torchao": "int8"}.get(mode, "")]
    refusals = result["refusals"]
    for what in ("merge_and_unload", "unload", "to_peft"):
        if mode == "fsdp2-torchao" and what != "merge_and_unload":  # (torchao's modules, kept aside, want it whole)
            assert refusals[what].startswith(f"{what}: 0: its int8 base is sharded (FSDP), and the Linear it came "
                                             "from takes its whole bytes back"), refusals[what]
            continue
        if quantized:  # (quantized bases, sharded: refused for that first)
            assert refusals[what].startswith(f"{what}: 0, 2, 4 hold a quantized base"), refusals[what]
            continue
        assert refusals[what].startswith(f"{what}: ['0', '2', '4'] are sharded by {by}"), refusals[what]
    assert result["still_fused"] == ["0", "2", "4"]
    assert f"['0'] are sharded by {by}" in refusals["inject"], refusals["inject"]
    if mode == "fsdp2":
        assert refusals["inject tensor parallel"].startswith(
            "inject: ['0'] hold DTensor parameters that no FSDP2 module (fully_shard) of the model holds: tensor "
            "parallelism"), refusals["inject tensor parallel"]
    if mode == "fsdp1":
        inner = load_file(str(tmp_path / "adapter-inner" / "adapter_model.safetensors"))
        assert inner.keys() == saved.keys() and all(torch.equal(inner[k], saved[k]) for k in saved)
        assert refusals["save_adapter outside"].startswith(
            "save_adapter: ['base_model.model.0.lora_A.weight', 'base_model.model.0.lora_B.weight', "
            "'base_model.model.2.lora_A.weight', 'base_model.model.2.lora_B.weight']... are sharded by a "
            "FullyShardedDataParallel (FSDP1) that wraps the model from outside"), refusals["save_adapter outside"]
        # the units holding the adapters, each whole alone (never the root, and so never the whole model)
        assert result["summoned"] == [("LoRALinear", False)] * 3, result["summoned"]
        assert not (tmp_path / "adapter-outside").exists()


def _check_multi(result, tmp_path, sharded):
    """DDP, FSDP1 and FSDP2 over inject_multi's layers: the gradients of one
    process on the whole batch, each row through its adapter; under FSDP
    (``sharded``: the parameters' type there) the file holds adapter 1's
    whole tensors, and loading it back gives each rank its part of adapter 1
    alone."""
    model = _multi_model(torch.device("cpu"))
    x, y = _data(torch.device("cpu"))
    _multi_step(model, model, x, y, torch.tensor(MULTI_IDS))
    single = _grads(model)
    assert set(result["grads"]) == set(single) and len(single) == 12
    for name, g in single.items():
        assert g.abs().max() > 0, name
        assert_close(result["grads"][name], g.double(), torch.float32, name)
    if sharded is None:
        return
    assert result["sharded"] == [sharded]
    _check_saved(result, tmp_path, fused_lora.integration.multi_fused_layers(model), lambda adapters: adapters[1])
    assert result["reloaded_equal"] and result["other_untouched"]
    assert result["combination"].startswith("save_adapter: combining adapters reads their whole tensors, and "), \
        result["combination"]


def _check_saved(result, tmp_path, layers, pick):
    """The file rank 0 wrote holds the whole tensors of ``layers`` (``pick``
    takes the one adapter's from a layer's ``lora_A`` / ``lora_B``) under
    PEFT's keys, nothing else; returns its tensors."""
    from safetensors.torch import load_file

    assert result["written"] == ["adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == 2 * len(layers)
    for name, layer in layers.items():
        for which in "AB":
            assert torch.equal(saved[f"base_model.model.{name}.lora_{which}.weight"],
                               pick(getattr(layer, f"lora_{which}")).detach())
    return saved


def _check_from_peft(result, tmp_path, use_dora):
    """FSDP2 over a PeftModel converted by from_peft: PEFT's unconverted model
    on the whole batch gives the same gradients, and save_adapter writes its
    adapters in PEFT's keys (DoRA's: the magnitudes' gradients too, and the
    magnitudes in the file)."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    model = _peft_model(torch.device("cpu"), use_dora)
    x, y = _data(torch.device("cpu"))
    nn.functional.cross_entropy(model(x), y).backward()
    single = {name.removesuffix(".default.weight"): p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert result["fused"] == {f"base_model.model.{i}": "DTensor" for i in (0, 2, 4)}  # (fused, then sharded)
    assert set(result["grads"]) == set(single) and len(single) == (9 if use_dora else 6)
    for name, g in single.items():
        assert_close(result["grads"][name], g.double(), torch.float32, name)
    assert result["written"] == ["adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    expected = {name.replace(".default", "").replace("vector.weight", "vector"): p.detach()
                for name, p in model.named_parameters() if p.requires_grad}  # (PEFT's magnitude key: no .weight)
    assert saved.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(saved[name], t), name
