"""Every shipped kernel configuration compiles for Hopper (sm_90) without a
GPU, fits its shared memory, does not spill, the 16-bit GEMMs use wgmma, and
the memory-bound skinny passes load 16-byte vectors."""

import dataclasses

import pytest

from fused_lora import compile_report
from fused_lora.kernels import configs


@pytest.fixture(scope="module")
def sm90():
    return compile_report.run(archs=(90,), jobs=2)


def test_every_config_compiles_for_sm90_cleanly(sm90):
    assert compile_report.problems(sm90) == []


def test_report_covers_every_shipped_config(sm90):
    shipped = configs.shipped_configs()
    gemm_seen = {(r.dtype, tuple(sorted(r.config.items()))) for r in sm90 if r.kernel == "gemm"}
    for dtype, pool in (("bf16", shipped["gemm_16bit"]), ("fp16", shipped["gemm_16bit"]),
                        ("fp32", shipped["gemm_fp32"])):
        for cfg in pool:
            assert (dtype, tuple(sorted(vars(cfg).items()))) in gemm_seen, (dtype, cfg)
    passes = {(r.kernel, r.pass_name) for r in sm90}
    gemm_passes = ("forward_in_loop", "forward_split", "dx_in_loop", "dx_in_loop_dropout", "dx", "dx_dropout", "dw")
    assert {("gemm", p) for p in gemm_passes} <= passes
    assert {("skinny", p) for p in ("forward_shrink", "dy_pass", "dA_pass")} <= passes
    # masked tails: K (GEMM), columns (skinny), a rank below its tile (both)
    assert {("gemm", p + tail) for p in gemm_passes for tail in ("+k_tail", "+r_tail")} <= passes
    assert {("skinny", p + tail) for p in ("forward_shrink", "dy_pass", "dA_pass")
            for tail in ("+c_tail", "+r_tail")} <= passes
    # the dropout passes read a seed drawn on the device (seed=None); an explicit seed is a value
    assert ({("gemm", p + "+seed_value") for p in ("dx_dropout", "dx_in_loop_dropout")}
            | {("skinny", p + "+seed_value") for p in ("forward_shrink", "dA_pass")}) <= passes
    # split-K partials and TMA loads (every 16-bit tile, each pass that uses it)
    assert {("gemm", p + "+split_k") for p in gemm_passes} <= passes
    # the in-loop passes: every rank tile the shrink can hold (it is the kernel's BLOCK_R), on every tile it fits
    in_loop = {(r.pass_name, r.dtype, r.block_r, tuple(sorted(r.config.items()))) for r in sm90}
    for dtype, elt in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
        tiles = [t for t in compile_report.IN_LOOP_RANK_TILES if t <= configs.in_loop_max_block_r(elt)]
        assert tiles[-1] == configs.in_loop_max_block_r(elt) and tiles[0] == configs.block_r_for(1)
        for p, mask in (("forward_in_loop", False), ("dx_in_loop", False), ("dx_in_loop_dropout", True)):
            for block_r in tiles:
                fitting = configs.gemm_candidates(elt, block_r, True, mask)
                assert fitting
                for cfg in fitting:
                    assert (p, dtype, block_r, tuple(sorted(vars(cfg).items()))) in in_loop, (p, dtype, block_r, cfg)
                    if elt == 2:
                        assert (p + "+tma", dtype, block_r, tuple(sorted(vars(cfg).items()))) in in_loop
    tma = {(r.pass_name, r.dtype, tuple(sorted(r.config.items()))) for r in sm90 if r.pass_name.endswith("+tma")}
    for dtype in ("bf16", "fp16"):
        for cfg in shipped["gemm_16bit"]:
            assert ("dw+tma", dtype, tuple(sorted(vars(cfg).items()))) in tma
        assert {p for p, d, _ in tma if d == dtype} >= {f"{p}{split}+tma" for p in gemm_passes
                                                        for split in ("", "+split_k")}
    # the persistent grid: every 16-bit tile it may run, each GEMM pass, with pointers and with TMA loads
    persistent = {(r.pass_name, r.dtype, tuple(sorted(r.config.items()))) for r in sm90
                  if r.pass_name.endswith("+persistent")}
    for dtype in ("bf16", "fp16"):
        for cfg in configs.gemm_candidates(2, 16, False, persistent=True):
            for loads in ("", "+tma"):
                assert (f"dw{loads}+persistent", dtype, tuple(sorted(vars(cfg).items()))) in persistent
        # (not dx in loop with its mask: it spills there, so the dispatch never runs it persistent)
        assert configs.gemm_candidates(2, 16, True, True, persistent=True) == []
        assert {p for p, d, _ in persistent if d == dtype} == {
            f"{p}{loads}+persistent" for p in gemm_passes if p != "dx_in_loop_dropout" for loads in ("", "+tma")}
    for r in sm90:
        assert r.shared is not None and r.shared <= configs.SMEM_LIMIT_SM90
        if r.kernel == "gemm" and r.dtype != "fp32":
            assert r.wgmma and not r.mma_sync
        assert r.tma == ("+tma" in r.pass_name), r.pass_name  # TMA copies exactly where asked for


def test_problems_catches_what_it_should():
    bad = compile_report.Result("gemm", "dx", "bf16", 90, {}, 16, shared=300_000, registers=255, spill_bytes=64,
                                wgmma=False)
    found = compile_report.problems([bad])
    assert any("shared memory" in p for p in found)
    assert any("spills" in p for p in found)
    assert any("wgmma" in p for p in found)
    no_tma = compile_report.Result("gemm", "dw+tma", "bf16", 90, {}, 16, shared=1000, registers=100, spill_bytes=0,
                                   wgmma=True, tma=False)
    assert any("TMA" in p for p in compile_report.problems([no_tma]))
    assert compile_report.problems([compile_report.Result("gemm", "dx", "bf16", 90, {}, 16, error="boom")])
    narrow = compile_report.Result("skinny", "dA_pass", "bf16", 90, {}, 16, shared=1000, registers=100,
                                   spill_bytes=0, load_widths=[4, 16])  # one operand's loads not vectors
    assert any("16-byte" in p for p in compile_report.problems([narrow]))
    rank_tail = dataclasses.replace(narrow, pass_name="dA_pass+r_tail")  # a rank tail keeps x in vectors
    assert any("16-byte" in p for p in compile_report.problems([rank_tail]))
    tail = dataclasses.replace(narrow, pass_name="dA_pass+c_tail", load_widths=[2])
    assert compile_report.problems([tail]) == []  # a masked column tail may load narrower
    reduce = compile_report.Result("reduce", "reduce", "fp32", 90, {}, 16, shared=0, registers=40, spill_bytes=0,
                                   load_widths=[4])
    assert any("16-byte" in p for p in compile_report.problems([reduce]))
    # two sums in one launch: the second (masked) is read narrower, the first must still be vectors
    paired = dataclasses.replace(reduce, pass_name="reduce+second", load_widths=[4, 16])
    assert compile_report.problems([paired]) == []
    assert any("16-byte" in p for p in compile_report.problems([dataclasses.replace(paired, load_widths=[4])]))
    fp32 = dataclasses.replace(narrow, dtype="fp32")  # fp32: the wide operand in vectors is enough...
    assert compile_report.problems([fp32]) == []
    assert compile_report.problems([dataclasses.replace(fp32, load_widths=[4])])  # ...but it must be


def test_load_widths_read_the_ptx():
    ptx = """
\tld.global.b16 { %rs1 }, [ %rd1 + 0 ];
\t@%p1 ld.global.v2.b32 { %r1, %r2 }, [ %rd2 + 0 ];
\tcp.async.ca.shared.global [ %r3 + 0 ], [ %rd3 + 0 ], 0x4, %r4;
\tcp.async.cg.shared.global [ %r5 + 0 ], [ %rd5 + 0 ], 0x10, %r6;
\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd6 + 0 ];
"""
    assert compile_report.load_widths(ptx) == [2, 4, 8, 16]
    assert compile_report.load_widths("") == []


def test_the_seed_load_is_left_out_of_the_load_widths():
    """A skinny pass reads its dropout seed, drawn on the device, in one
    4-byte load: not a load of the wide operand, whose widths are checked."""
    ptx = """
\tld.param.b64 \t%rd13, [lora_skinny_kernel_param_21];
\tld.param.b64 \t%rd2, [lora_skinny_kernel_param_0];
\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd2 + 0 ];
\tld.global.b32 { %r53 }, [ %rd13 + 0 ];
"""
    assert compile_report.load_widths(ptx) == [4, 16]
    assert compile_report.load_widths(compile_report.without_seed_load(ptx, 21)) == [16]
    with pytest.raises(ValueError, match="not loaded once"):
        compile_report.without_seed_load(ptx, 5)
    with pytest.raises(ValueError, match="expected one 4-byte load"):
        compile_report.without_seed_load(ptx, 0)  # (param 0's pointer feeds a vector load, not a seed)
