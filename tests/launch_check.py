"""Run by tests/test_launch.py in a process of its own (without
TRITON_INTERPRET, whose patches of triton.language another test may leave
behind): a tiny kernel launched through the launch cache with Triton's own
JITFunction.run and CompiledKernel, compiled for sm_90 on the CPU; only the
driver (device, stream, target) and the launcher, which need a GPU, stand
in. Prints ``ok`` when the launch that compiles goes through
JITFunction.run, the next through the compiled kernel kept, and Triton's
launcher gets the same arguments both times."""

import torch
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import CompiledKernel
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from fused_lora.kernels import launch as launch_mod


def _tiny(x_ptr, y_ptr, n, scale, opt_ptr, BLOCK: tl.constexpr, HAS_OPT: tl.constexpr = False):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * scale, mask=mask)


class _Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 1234

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def main() -> None:
    launched, runs = [], []

    def handles(self):
        if self.module is None:
            self.module, self.function = "module", f"function {self.hash}"
            self._run = lambda *args: launched.append(args)

    real_run = JITFunction.run
    driver._active = _Driver()
    CompiledKernel._init_handles = handles
    JITFunction.run = lambda self, *a, **k: runs.append(1) or real_run(self, *a, **k)
    torch.cuda.current_device = lambda: 0
    launch_mod.set_enabled(True)
    kernel = JITFunction(_tiny)
    x, y = torch.randn(100), torch.empty(100)

    def values(args):
        return [(id(a), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]

    def as_seen(call):  # (grid, stream, function, packed metadata, launch metadata, hooks, the arguments)
        seen = values(call)
        seen[6] = type(seen[6])  # (made for each launch)
        return seen

    for n in (100, 100, 60, 1):
        launch_mod.launch(kernel, (4,), (x, y, n, 2.0, None), dict(BLOCK=32, num_warps=4))
    assert len(runs) == 2 and len(launched) == 4, (runs, launched)  # (100 and 60: one kernel; 1 its own)
    first, hit, other, one = map(as_seen, launched)
    assert hit == first, (hit, first)
    assert first[:4] == [4, 1, 1, 1234] and first[-7:] == values((x, y, 100, 2.0, None, 32, False)), first
    assert other[:-5] == first[:-5] and other[-5] == 60, other
    assert one[4] != first[4] and first[4].startswith("function"), (one, first)  # (another kernel's function)
    print("ok")


if __name__ == "__main__":
    main()
