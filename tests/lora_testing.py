"""The test modules' helpers: those of fused_lora.testing (one tolerance
table for the suite and for ``fused-lora check``), a launch counter, the
sm_90 compile reports run in the background (:class:`BackgroundCompileReports`),
and the small transformers models the integration tests build from configs."""

import dataclasses
import json

import torch

from fused_lora.testing import (  # noqa: F401
    DEVICE,
    DTYPES,
    TOLERANCE,
    assert_close,
    assert_same_sums,
    interpreted_tma_k_n,
    make_params,
    make_x,
    normalized_error,
    parse_shard,
    reference64,
    shard,
)


def opcheck_lora_ops(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, extra):
    """``torch.library.opcheck`` of the forward op on these arguments
    (``extra``: its arguments after ``seed``), then of the backward op on its
    outputs (dx, db, dA and dB asked for); returns the forward's ``(y, xa)``
    and the ``dy`` the backward took."""
    args = (x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, *extra)
    torch.library.opcheck(torch.ops.fused_lora.lora_linear_fwd.default, args)
    y, xa = torch.ops.fused_lora.lora_linear_fwd(*args)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fused_lora.lora_linear_bwd.default,
                          (dy, x.detach(), weight, lora_A.detach(), lora_B.detach(), xa.detach(), scaling, dropout_p,
                           seed, True, False, True, True, True, *extra))
    return y, xa, dy


def count_launches(monkeypatch, module, kernel: str, outside_modes: bool = False) -> list:
    """The grids of ``module.kernel``'s launches from now on, in order. The
    counter is of the kernel's own type, with its state: a launcher that asks
    what it is (``kernels.common.is_interpreted``: the interpreter's bf16
    upcast) gets the answer it would without the counter. ``outside_modes``:
    each launch runs with the dispatch modes of the moment off (a mode that
    counts operators then sees none of the interpreter's own)."""
    from torch.utils._python_dispatch import _disable_current_modes

    grids = []
    real = getattr(module, kernel)

    class Counting(type(real)):
        def __getitem__(self, grid):
            grids.append(grid)
            if not outside_modes:
                return real[grid]

            def run(*args, **kwargs):
                with _disable_current_modes():
                    return real[grid](*args, **kwargs)
            return run

    counting = object.__new__(Counting)
    counting.__dict__.update(vars(real))
    monkeypatch.setattr(module, kernel, counting)
    return grids


class BackgroundCompileReports:
    """The sm_90 compile reports (``python -m fused_lora.compile_report --arch
    90 --json``), each in a subprocess, one after the other, started when
    collection ends (``tests/conftest.py``): they keep the cores the rest of
    the suite leaves busy, and their tests, run last, wait for them.
    ``name``: "newest" (this Triton) or "gpu_machine" (Triton 3.6 from
    ``FUSED_LORA_GPU_TRITON``).

    How much each compiles (:data:`fused_lora.compile_report.SCOPES`): with
    either Triton every code path once, on the tile it runs with at large M
    and the largest rank tile it runs with, fp16's GEMMs and skinny passes
    as bf16's twins where those come near the register limit (``paths``:
    511 kernels and about 60 twins now; the timings below were measured at
    359 and about 20; with every fp16 kernel, 517, the two
    reports took about 1,700 of CI's 3,600 CPU-seconds). Every
    tile of both (``tiles``: 1,464 each; ``make compile-report``) took 31
    minutes of CI's 43 on its two cores (AMD EPYC, Triton 3.9: 20 minutes
    alone, 3.6: 11); every rank tile with 3.6 (``kernels``: 1,026) still left
    CI at 29 minutes, 7 of them the suite's wait for that report. What
    ``paths`` leaves to ``make compile-report``: a kernel at a smaller rank
    tile that spills where its largest does not (registers are not monotone
    in the rank tile; Triton 3.5.1's 8 spills were of that kind)."""

    TIMEOUT_S = 3600
    #: The reports run at a lower priority than the suite (``nice``): the
    #: suite keeps a core and the reports fill the rest, and every core once
    #: it ends. CI takes as long either way (measured when 3.6 compiled
    #: ``kernels``: 1,565 s both ways on two cores; the work is what it is),
    #: but the suite's durations are its own: run beside the reports as
    #: equals, its slowest tests took up to 1.7 times as long.
    NICENESS = 10
    COMMAND = ("-m", "fused_lora.compile_report", "--arch", "90", "--json", "--jobs", "2")
    SCOPES = {"newest": "paths", "gpu_machine": "paths"}

    def __init__(self):
        import concurrent.futures

        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile-report")
        self._futures = {}
        self._running = []

    @staticmethod
    def environment(name: str, interpret: bool = False) -> dict:
        """The subprocess environment: compiling needs the real (JIT) kernels,
        so no TRITON_INTERPRET unless asked; the GPU machine's Triton first on
        the path."""
        import os

        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if name == "gpu_machine":
            triton_dir = os.environ["FUSED_LORA_GPU_TRITON"]
            env["PYTHONPATH"] = os.pathsep.join([triton_dir] + [p for p in [env.get("PYTHONPATH")] if p])
        if interpret:
            env["TRITON_INTERPRET"] = "1"
        return env

    def start(self, name: str) -> None:
        if name not in self._futures:
            self._futures[name] = self._pool.submit(self._run, name)

    def result(self, name: str):
        """The finished report's ``subprocess.CompletedProcess`` (started now if not yet)."""
        self.start(name)
        return self._futures[name].result()

    def _run(self, name: str):
        import shutil
        import subprocess
        import sys

        nice = shutil.which("nice")  # (below the suite: it takes a core whenever it runs, they the rest)
        cmd = ([nice, "-n", str(self.NICENESS)] if nice else []) + [sys.executable, *self.COMMAND, "--scope",
                                                                     self.SCOPES[name]]
        # (its own process group: killed, the report's compile workers go with it, and with them the
        # ends of its pipes they hold, else communicate() waited on them for ever)
        with subprocess.Popen(cmd, env=self.environment(name), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) as proc:
            self._running.append(proc)
            try:
                out, err = proc.communicate(timeout=self.TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._kill(proc)
                out, err = proc.communicate()
                err += f"\n(killed after {self.TIMEOUT_S} s)"
            finally:
                self._running.remove(proc)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def stop(self) -> None:
        """At the session's end: kill what still runs (an interrupted session)."""
        for future in self._futures.values():
            future.cancel()
        for proc in list(self._running):
            self._kill(proc)
        self._pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _kill(proc) -> None:
        """Kill ``proc`` and its process group (the report's workers)."""
        import os
        import signal

        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # (gone already)
            pass


def compiled_as_planned(report: dict) -> list:
    """The results of a compile report's JSON (``--arch 90 --json``), once
    checked to be exactly what its scope plans, in order: each job of
    ``jobs_for(90, scope)``, then the fp16 twins of the bf16 kernels near
    the register limit, each once."""
    from fused_lora import compile_report

    def identity(r) -> tuple:
        return r.kernel, r.pass_name, r.dtype, r.arch, json.dumps(r.config, sort_keys=True), r.block_r

    results = [compile_report.Result(**r) for r in report["results"]]
    jobs = compile_report.jobs_for(90, scope=report["scope"])
    planned = jobs + compile_report.fp16_twins(jobs, results[:len(jobs)])
    assert [identity(r) for r in results] == [identity(compile_report.result_of(j)) for j in planned]
    return results


def warp_specialized_report(proc) -> list:
    """The results of ``compile_report --warp-specialized --json``, checked:
    every kernel gpu_probe's ``+ws`` rows launch, in order, compiled for
    sm_90 through TMA on wgmma within the shared memory, and each taken by
    Triton's warp specialisation (its warps' registers set apart with
    setmaxnreg), the exit status 0."""
    from fused_lora import compile_report
    from fused_lora.kernels import configs

    assert proc.stdout.strip(), proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    results = [compile_report.Result(**r) for r in report["results"]]
    assert report["failures"] == [] and proc.returncode == 0, report["failures"]
    jobs = compile_report.warp_specialized_jobs()
    assert [r.pass_name for r in results] == [compile_report.result_of(j).pass_name for j in jobs]
    assert {(r.pass_name.split("+")[0], r.dtype) for r in results} == {
        (p, d) for p in ("forward_split", "dx") for d in ("bf16", "fp16")}
    assert all(r.arch == 90 and r.config == dataclasses.asdict(configs.WARP_SPECIALIZED_GEMM) for r in results)
    assert all(r.warp_specialized and r.wgmma and r.tma and r.shared <= configs.SMEM_LIMIT_SM90 for r in results), \
        results
    return results


#: The vocabulary of the tiny transformers models.
VOCAB = 61


def assert_same_adapter_files(got, expected) -> None:
    """Directories of PEFT adapter files (``save_pretrained``'s, an adapter a
    subdirectory too) hold the same files: the tensors' files byte for byte,
    the configs as JSON, ``target_modules`` as a set (PEFT keeps a set,
    written in its iteration order, which a copied set may not share)."""
    names = sorted(p.relative_to(expected) for p in expected.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file())
    for name in names:
        if name.suffix == ".json":
            configs = [json.loads((d / name).read_text()) for d in (got, expected)]
            for config in configs:
                if isinstance(config.get("target_modules"), list):
                    config["target_modules"] = sorted(config["target_modules"])
            assert configs[0] == configs[1], name
        else:
            assert (got / name).read_bytes() == (expected / name).read_bytes(), name


def trained_logits(model, names, input_ids):
    """Each fused layer ``names`` of ``model`` given a trained adapter (its
    lora_B drawn from N(0, 0.3²)), then ``(logits, logits with the adapters
    off)`` for ``input_ids``, without gradient."""
    import fused_lora

    with torch.no_grad():
        for name in names:
            torch.nn.init.normal_(model.get_submodule(name).lora_B, 0, 0.3)
        fused = model(input_ids=input_ids).logits
        with fused_lora.disable_adapters(model):
            return fused, model(input_ids=input_ids).logits


def tiny_llama(seed=0, **overrides):
    """A two-layer transformers Llama built from a config (nothing downloaded), on DEVICE."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   **overrides)
    return transformers.LlamaForCausalLM(cfg).to(DEVICE)


def skip_if_dynamo_cannot_trace_llama(ids):
    """Skips where this torch's dynamo cannot trace this transformers' Llama
    in one graph without fused_lora either (torch 2.8 with transformers 5.24:
    its per-layer config view's iterator), else returns: call it where a
    fused model's ``fullgraph=True`` compile raised ``Unsupported``."""
    import pytest
    import transformers

    plain = tiny_llama(seed=6)
    torch._dynamo.reset()
    try:
        torch.compile(lambda i: plain(input_ids=i, labels=i).loss, backend="aot_eager", fullgraph=True)(ids)
    except torch._dynamo.exc.Unsupported as err:
        pytest.skip(f"torch {torch.__version__}'s dynamo cannot trace transformers {transformers.__version__}'s "
                    f"Llama in one graph, unfused too: {str(err).splitlines()[0]}")


def tiny_gpt2(seed=0):
    """A two-layer transformers GPT-2 (Conv1D layers, dropout off) built from a config, on DEVICE."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).to(DEVICE)
