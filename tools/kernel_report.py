#!/usr/bin/env python3
"""Compile the attention kernels for A100 (sm_80) / H100 (sm_90) on a CPU machine and report
registers, spills and shared memory per variant.

No GPU is needed: ``triton.compile`` with a ``GPUTarget`` runs the whole pipeline to a cubin
with the ptxas that ships with Triton. The same compile is the CPU check that the kernels are
valid GPU code (the interpreter accepts code a real compile rejects).

Run it with ``TRITON_INTERPRET`` unset: a process that imported Triton in interpreter mode
cannot compile (tests therefore run this tool in a subprocess).

``--candidates`` compiles every autotune candidate tile config of every kernel (heaviest mask
variant, and plain causal), and flags configs over the architecture's shared memory.

Usage: python tools/kernel_report.py [--arch 80 90] [--all [--no-seg] | --candidates]
           [--head-dim 64 128] [--dtype fp16 bf16] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from kernels import flash_attention as fa  # noqa: E402
from kernels.flash_attention import backward, forward, launcher  # noqa: E402

KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")
PREPROCESS = "bwd_pre"  # the backward's delta preprocess (no mask, bias or tiles to tune)
_TUNER_NAMES = {"fwd": "fwd", "bwd_dkdv": "dkdv", "bwd_dq": "dq"}  # names in the kernel file
# Shared memory one block may use (opt-in maximum): A100 163 KiB, H100/H200 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_DATA_ARGS = {"Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV"}  # tensors in the inputs' dtype
_FP32_ARGS = {"LSE", "DELTA", "BIAS", "DBIAS"}
_INT_ARGS = {"QSEG", "KSEG", "QSPAN", "KSPAN", "PREFIX", "PREFIX_RANGE", "QPOS", "KPOS"}


@dataclass(frozen=True)
class Variant:
    """One compiled specialisation of one kernel."""

    kernel: str  # "fwd", "bwd_dkdv" or "bwd_dq"
    mode: int  # fa.CAUSAL / PREFIX / BIDIRECTIONAL / CROSS
    dtype: str  # "fp16", "bf16" or "fp32"
    head_dim: int
    has_seg: bool = True
    has_bias: bool = True
    tiles: tuple[int, int, int, int] | None = None  # (BLOCK_M, BLOCK_N, warps, stages); None:
    # the kernel's default config
    dropout: bool = False  # attention dropout compiled in (HAS_DROPOUT)

    @property
    def name(self) -> str:
        extras = "".join(("+seg" if self.has_seg else "", "+bias" if self.has_bias else "",
                          "+dropout" if self.dropout else ""))
        tiles = "" if self.tiles is None else "@" + "x".join(map(str, self.tiles))
        return (f"{self.kernel}/{fa.MODE_NAMES[self.mode]}{extras}/{self.dtype}/"
                f"d{self.head_dim}{tiles}")

    def block_config(self) -> fa.BlockConfig:
        if self.kernel == PREPROCESS:
            return fa.BlockConfig(launcher._preprocess_blocks(self.head_dim)[1], 16, 4, 1)
        if self.tiles is not None:
            return fa.BlockConfig(*self.tiles)
        return fa.default_block_config(_TUNER_NAMES[self.kernel], self.head_dim,
                                       TORCH_DTYPES[self.dtype])


def default_variants() -> list[Variant]:
    """A small set reaching every kernel, mode branch and dot precision once (the test run)."""
    return [
        Variant("fwd", fa.PREFIX, "fp16", 64),  # the prefix branch also holds the causal code
        Variant("bwd_dkdv", fa.PREFIX, "bf16", 128),
        Variant("bwd_dq", fa.CROSS, "fp16", 64),
        Variant("fwd", fa.BIDIRECTIONAL, "fp32", 32, has_bias=False),  # 3xTF32 dots
        *(Variant(kernel, fa.PREFIX, "bf16", head_dim, dropout=True)
          for kernel in KERNELS for head_dim in (64, 128)),  # the heaviest, at each default
        # without segment ids: the split loops (free tiles unmasked, then the masked ones)
        Variant("fwd", fa.CAUSAL, "fp16", 64, has_seg=False),
        Variant("bwd_dkdv", fa.PREFIX, "bf16", 128, has_seg=False, dropout=True),
        Variant("bwd_dq", fa.PREFIX, "fp16", 64, has_seg=False, dropout=True),
        Variant(PREPROCESS, fa.CAUSAL, "bf16", 128, has_seg=False, has_bias=False),
    ]


def all_variants(head_dims=(32, 64, 128), dtypes=("fp16", "bf16", "fp32"),
                 has_seg: bool = True) -> list[Variant]:
    """Every kernel x mode x dtype x head dim, with bias and segments (the heaviest case; with
    ``has_seg`` False: without them, where the kernels split their loops into free and masked
    tiles), and the preprocess per dtype x head dim."""
    return [Variant(kernel, mode, dtype, head_dim, has_seg=has_seg)
            for kernel, mode, dtype, head_dim in itertools.product(
                KERNELS, sorted(fa.MODE_NAMES), dtypes, head_dims)] + [
        Variant(PREPROCESS, fa.CAUSAL, dtype, head_dim, has_seg=False, has_bias=False)
        for dtype, head_dim in itertools.product(dtypes, head_dims)]


def candidate_variants(head_dims=(32, 64, 128), dtypes=("fp16", "bf16", "fp32"),
                       kernels=KERNELS) -> list[Variant]:
    """Every autotune candidate of every kernel, for prefix + segments + bias + dropout (the
    heaviest variant: it holds the causal code too) and for plain causal (the benchmark's)."""
    variants = []
    for kernel, dtype, head_dim in itertools.product(kernels, dtypes, head_dims):
        for config in fa.candidate_block_configs(_TUNER_NAMES[kernel], head_dim,
                                                 TORCH_DTYPES[dtype]):
            tiles = (config.block_m, config.block_n, config.num_warps, config.num_stages)
            variants.append(Variant(kernel, fa.PREFIX, dtype, head_dim, tiles=tiles,
                                    dropout=True))
            variants.append(Variant(kernel, fa.CAUSAL, dtype, head_dim, has_seg=False,
                                    has_bias=False, tiles=tiles))
    return variants


def largest_candidates(head_dim: int = 128, dtype: str = "bf16") -> list[Variant]:
    """Per kernel, the candidate with the largest tiles (the most shared memory / registers),
    heaviest variant: the fast compile check."""
    chosen = []
    for kernel in KERNELS:
        configs = fa.candidate_block_configs(_TUNER_NAMES[kernel], head_dim, TORCH_DTYPES[dtype])
        big = max(configs, key=lambda c: (c.block_m * c.block_n, c.num_stages, c.num_warps))
        chosen.append(Variant(kernel, fa.PREFIX, dtype, head_dim, dropout=True, tiles=(
            big.block_m, big.block_n, big.num_warps, big.num_stages)))
    return chosen


def missing_toolchain(arch: int) -> str | None:
    """Why this machine cannot compile for ``sm_<arch>`` (None when it can)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path
    except Exception as error:  # no NVIDIA backend in this Triton build
        return f"no NVIDIA backend / ptxas in this triton: {error}"
    if not path or not os.access(path, os.X_OK):
        return f"ptxas not executable at {path!r}"
    return None


def _compile_args(fn, variant: Variant):
    """(signature, constexprs, attrs, options) as a launch on contiguous tensors specialises."""
    config = variant.block_config()
    constexprs = dict(
        MODE=variant.mode, HAS_SEG=variant.has_seg, HAS_BIAS=variant.has_bias,
        HAS_DROPOUT=variant.dropout,
        BIAS_RANGE=fa.bias_range(32, 128) if variant.has_bias else 0,
        HEAD_DIM=variant.head_dim, BLOCK_D=max(16, 1 << (variant.head_dim - 1).bit_length()),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        DOT_PRECISION=launcher._dot_precision(TORCH_DTYPES[variant.dtype]),
    )
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    signature, attrs = {}, {}
    aligned = [["tt.divisibility", 16]]
    for index, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.startswith("stride") and arg.endswith("d"):  # head-dim stride 1: specialised
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg in _DATA_ARGS | _FP32_ARGS | _INT_ARGS:
            signature[arg] = (f"*{variant.dtype}" if arg in _DATA_ARGS
                              else "*fp32" if arg in _FP32_ARGS else "*i32")
            attrs[(index,)] = aligned
        elif arg in ("scale", "dropout_p"):
            signature[arg] = "fp32"
        elif arg == "seed":  # always int64 (dropout._kernel_seed)
            signature[arg] = "i64"
        else:
            signature[arg] = "i32"
            if arg.startswith("stride") and arg not in ("stride_pb", "stride_pm") \
                    and variant.head_dim % 16 == 0:
                attrs[(index,)] = aligned
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return signature, constexprs, attrs, options


def compile_variant(variant: Variant, arch: int):
    """The Triton ``CompiledKernel`` of ``variant`` for ``sm_<arch>``; raises on compile errors."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = {"fwd": forward._fwd_kernel, "bwd_dkdv": backward._bwd_dkdv_kernel,
          "bwd_dq": backward._bwd_dq_kernel,
          PREPROCESS: backward._bwd_preprocess_kernel}[variant.kernel]
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("kernels were imported under TRITON_INTERPRET=1; run without it")
    signature, constexprs, attrs, options = _compile_args(fn, variant)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_usage(compiled, arch: int) -> dict[str, int]:
    """Registers and spill bytes from ptxas -v on the kernel's PTX (Triton's own ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        log = subprocess.run(
            [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(arch)}", str(ptx), "-o", str(ptx) + ".o"],
            check=True, capture_output=True, text=True,
        ).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "registers": int(registers.group(1)) if registers else -1,
        "spill_stores": int(spills.group(1)) if spills else -1,
        "spill_loads": int(spills.group(2)) if spills else -1,
    }


def report(variant: Variant, arch: int) -> dict:
    """One result row: ok / skipped / error, and the resource usage when compiled."""
    row = {"variant": variant.name, **asdict(variant), "arch": arch}
    reason = missing_toolchain(arch)
    if reason is not None:
        return {**row, "status": "skipped", "reason": reason}
    start = time.perf_counter()
    try:
        compiled = compile_variant(variant, arch)
        usage = ptxas_usage(compiled, arch)
    except Exception as error:  # report every failing variant, then exit non-zero
        return {**row, "status": "error", "reason": f"{type(error).__name__}: {error}"}
    shared = compiled.metadata.shared
    if shared > SHARED_LIMIT.get(arch, shared):
        return {**row, "status": "error", **usage, "shared": shared,
                "reason": f"needs {shared} B of shared memory, sm_{arch} has {SHARED_LIMIT[arch]}"}
    return {**row, "status": "ok", **usage, "shared": shared,
            "num_warps": compiled.metadata.num_warps, "seconds": time.perf_counter() - start}


def _print_row(row: dict) -> None:
    head = f"{row['variant']:56} {row['arch']:>3}"
    if row["status"] != "ok":
        print(f"{head} {row['status'].upper()}: {row['reason'].splitlines()[0][:160]}")
        return
    spills = f"{row['spill_stores']}/{row['spill_loads']}"
    print(f"{head} {row['registers']:>5} {spills:>16} {row['shared']:>9} {row['num_warps']:>5} "
          f"{row['seconds']:>5.1f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                        help="CUDA compute capabilities (80 = A100, 90 = H100/H200)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--all", action="store_true",
                       help="every kernel x mode x dtype x head dim (slow: ~2 s each)")
    group.add_argument("--candidates", action="store_true",
                       help="every autotune candidate config of every kernel (slow)")
    group.add_argument("--largest-candidates", action="store_true",
                       help="each kernel's largest candidate at head dim 128, bf16 (fast)")
    parser.add_argument("--head-dim", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--dtype", nargs="+", default=["fp16", "bf16", "fp32"],
                        choices=sorted(TORCH_DTYPES))
    parser.add_argument("--no-seg", action="store_true",
                        help="with --all: the variants without segment ids (the kernels' "
                             "split loops: free tiles without mask arithmetic, then masked)")
    parser.add_argument("--json", action="store_true", help="one JSON list on stdout")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    if args.no_seg and not args.all:
        parser.error("--no-seg selects among the --all variants: pass --all too")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset
    if args.all:
        variants = all_variants(tuple(args.head_dim), tuple(args.dtype), not args.no_seg)
    elif args.candidates:
        variants = candidate_variants(tuple(args.head_dim), tuple(args.dtype))
    elif args.largest_candidates:
        variants = largest_candidates()
    else:
        variants = default_variants()
    if not args.json:
        print(f"{'variant':56} {'sm':>3} {'regs':>5} {'spill st/ld (B)':>16} {'smem (B)':>9} "
              f"{'warps':>5} {'s':>5}")
    rows = []
    for variant, arch in itertools.product(variants, args.arch):
        rows.append(report(variant, arch))
        if not args.json:
            _print_row(rows[-1])
    failures = sum(row["status"] == "error" for row in rows)
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{len(rows)} variants: {sum(r['status'] == 'ok' for r in rows)} compiled, "
              f"{failures} failed, {sum(r['status'] == 'skipped' for r in rows)} skipped")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
