"""Tile configs of the three kernels: fixed defaults, autotune candidates, the autotuner.

Our own small autotuner instead of ``triton.autotune``: it times on the call's own tensors
through a launch closure (the bias gradient must be zeroed before every timed dQ launch), falls
back to the defaults when memory runs out while timing, runs nothing under the interpreter
(where ``triton.autotune`` with several configs fails), and keeps its choices on disk keyed by
GPU model and Triton version (``triton.autotune``'s cache is per process).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

from .masks import _interpreting

logger = logging.getLogger("kernels.flash_attention")


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch shape of one kernel (fixed, CPU-safe defaults; autotune on top)."""

    block_m: int  # queries per tile (a power of two >= 16: dots need K >= 16)
    block_n: int  # keys per tile (same rule)
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"BlockConfig.{name} must be a power of two >= 16, got {size}")


def default_block_configs(head_dim: int, dtype: torch.dtype = torch.float16
                          ) -> tuple[BlockConfig, tuple[BlockConfig, BlockConfig]]:
    """(forward, (dK/dV, dQ)) tile configs: the pair is what ``bwd_config=`` takes.

    fp16/bf16 at head dims 64 and 128: every mode, with and without segment ids and T5 bias,
    compiles without register spills on sm_80 and sm_90 (triton 3.9; ``tools/kernel_report.py``
    prints the numbers, kernels/README.md has the table). With dropout too on sm_90; on sm_80 a
    few variants with dropout spill 4-16 B (the smallest tiles that remove those spill more
    elsewhere). The spills the previous tiles had (bytes stored, sm_80): dK/dV 32x64x4x2 at d64
    24-40 with segments and bias (104 with dropout), the forward 128x32x8x3 at d128 8 for prefix
    (16 with dropout). fp32 (3xTF32 dots) gets small tiles: it is a correctness path, and its
    backward still spills at head dim 128.
    """
    # Register pressure comes mostly from the per-element mask, bias and dropout work on the
    # [block_m, block_n] tile: dQ holds a [block_m, head_dim] accumulator next to it (32x64
    # spills with dropout at d64), dK/dV two [block_n, head_dim] ones (64 queries x 32 keys
    # with 3 stages fits), the d128 forward a 128-wide accumulator (64 rows over 8 warps fits).
    if dtype == torch.float32:
        small = BlockConfig(32, 32, num_warps=4, num_stages=2)
        return small, (small, small)
    dkdv = BlockConfig(64, 32, num_warps=4, num_stages=3)
    if head_dim <= 32:  # (ptxas spills 32x32 dQ tiles at d32 on sm_90, not 32x64 ones)
        return (BlockConfig(128, 32, num_warps=4, num_stages=3),
                (dkdv, BlockConfig(32, 64, num_warps=4, num_stages=2)))
    backward = (dkdv, BlockConfig(32, 32, num_warps=4, num_stages=2))
    if head_dim <= 64:
        return BlockConfig(128, 64, num_warps=8, num_stages=3), backward
    dq = BlockConfig(32, 32, num_warps=4, num_stages=2)
    return BlockConfig(64, 32, num_warps=8, num_stages=3), (dq, dq)


KERNELS = ("fwd", "dkdv", "dq")  # the forward kernel and the two backward kernels
CONFIG_ENV = "MEGARCH_FLASH_CONFIG"  # "auto" (default), "default", or "fwd=128x64x8x3,bwd=..."


def default_block_config(kernel: str, head_dim: int, dtype: torch.dtype) -> BlockConfig:
    """The fixed default of one kernel ("fwd", "dkdv" or "dq"): ``default_block_configs``."""
    fwd, (dkdv, dq) = default_block_configs(head_dim, dtype)
    return {"fwd": fwd, "dkdv": dkdv, "dq": dq}[kernel]


def candidate_block_configs(kernel: str, head_dim: int, dtype: torch.dtype
                            ) -> list[BlockConfig]:
    """The autotuner's candidates for one kernel ("fwd", "dkdv" or "dq"), the default first.

    Each compiles for sm_80 and sm_90 within their shared memory (tests/kernels/test_compile.py;
    ``tools/kernel_report.py --candidates`` prints registers and spills). The forward wants
    long query blocks; dK/dV (outer loop over keys) long key blocks and dQ long query blocks,
    as in FlashAttention-2. fp32 (3xTF32, a correctness path) keeps small tiles.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    default = default_block_config(kernel, head_dim, dtype)
    wide = head_dim > 64  # 128-wide rows: fewer, narrower tiles keep registers in bounds
    if dtype == torch.float32:  # d128: larger backward tiles exceed sm_80's shared memory
        extra = ([BlockConfig(64, 32, 4, 2)] if kernel == "fwd" else
                 [BlockConfig(32, 32, 8, 2)] if wide else
                 [BlockConfig(32, 64, 4, 2)] if kernel == "dkdv" else [BlockConfig(64, 32, 4, 2)])
    elif kernel == "fwd":
        extra = ([BlockConfig(128, 16, 8, 3), BlockConfig(64, 32, 8, 2), BlockConfig(128, 32, 8, 3),
                  BlockConfig(64, 64, 8, 3), BlockConfig(128, 32, 8, 2)] if wide else
                 [BlockConfig(128, 64, 8, 2), BlockConfig(64, 64, 4, 3), BlockConfig(64, 32, 4, 3),
                  BlockConfig(128, 32, 8, 3)])
    elif kernel == "dkdv":
        extra = ([BlockConfig(16, 64, 4, 2), BlockConfig(32, 64, 8, 2), BlockConfig(64, 64, 8, 2),
                  BlockConfig(16, 32, 4, 2)] if wide else
                 [BlockConfig(32, 64, 4, 2), BlockConfig(32, 128, 8, 2), BlockConfig(64, 64, 8, 2),
                  BlockConfig(16, 64, 4, 2), BlockConfig(32, 32, 4, 2)])
    else:
        extra = [BlockConfig(64, 32, 4, 2), BlockConfig(128, 32, 8, 2), BlockConfig(64, 64, 8, 2),
                 BlockConfig(32, 64, 4, 2)]
    return [default] + [config for config in extra if config != default]


def _parse_block_config(text: str) -> BlockConfig:
    fields = text.lower().split("x")
    if len(fields) != 4 or not all(field.isdigit() for field in fields):
        raise ValueError(f"{CONFIG_ENV}: {text!r} is not BLOCK_MxBLOCK_NxWARPSxSTAGES "
                         "(e.g. 128x64x8x3)")
    return BlockConfig(*map(int, fields))


@functools.lru_cache(maxsize=16)
def forced_block_configs(setting: str) -> dict[str, BlockConfig] | None:
    """The kernels' configs forced by a ``MEGARCH_FLASH_CONFIG`` value.

    ``""`` / ``"auto"``: none forced ({}): autotune on a GPU, defaults elsewhere. ``"default"``:
    None (the fixed defaults, no tuning). ``"fwd=128x64x8x3,bwd=32x64x4x2"``: those kernels
    (``fwd``, ``dkdv``, ``dq``; ``bwd`` sets both backward kernels); the others as for "auto".
    """
    setting = setting.strip()
    if setting in ("", "auto"):
        return {}
    if setting == "default":
        return None
    forced = {}
    for item in setting.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in (*KERNELS, "bwd") or not value:
            raise ValueError(f"{CONFIG_ENV}={setting!r}: expected 'auto', 'default' or "
                             "comma-separated KERNEL=BMxBNxWARPSxSTAGES with KERNEL one of fwd, "
                             f"bwd, dkdv, dq (e.g. fwd=128x64x8x3,bwd=32x64x4x2), got {item!r}")
        for kernel in (("dkdv", "dq") if name == "bwd" else (name,)):
            forced[kernel] = _parse_block_config(value)
    return forced


def _length_bucket(length: int) -> int:
    """Sequence-length bucket of the tuning key: the next power of two, from 128 to 16384."""
    return min(max(128, triton.next_power_of_2(length)), 16384)


def _tuning_available(device: torch.device) -> bool:
    """Autotuning needs compiled kernels on a GPU (the interpreter cannot time them)."""
    return device.type == "cuda" and not _interpreting()


def _bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20)


CACHE_ENV = "MEGARCH_AUTOTUNE_CACHE"  # the tuned-tiles file; "off": tune per process only
_CACHE_VERSION = 1


def autotune_cache_path() -> Path | None:
    """The on-disk autotune cache: ``$MEGARCH_AUTOTUNE_CACHE`` (e.g. a file in the run
    directory), else ``$XDG_CACHE_HOME/megarch/autotune.json`` (``~/.cache/...``); None when the
    variable is ``off``."""
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() == "off":
        return None
    if setting:
        return Path(setting).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "megarch" / "autotune.json"


def _candidate_errors() -> tuple[type[BaseException], ...]:
    """What a candidate that cannot run raises: too much shared memory / too many registers,
    or a failed compile (Triton's own, or ptxas). Anything else is a bug and is raised."""
    from triton.compiler.errors import CompilationError
    from triton.runtime import errors

    extra = tuple(getattr(errors, name) for name in ("PTXASError",) if hasattr(errors, name))
    return (errors.OutOfResources, CompilationError, *extra)


def _key_text(key: tuple) -> str:
    return "|".join(map(str, key))


class _Autotuner:
    """The fastest candidate per tuning key, timed on the first call's own tensors, then kept in
    memory and in an on-disk JSON cache (``autotune_cache_path``), so a resumed run (or another
    process on the same GPU model and Triton version, both in the key) uses the same tiles.

    A candidate that cannot run (out of resources, compile failure) is skipped; tiles never
    change the result beyond rounding, so any candidate is a correct choice. A cached choice
    that is no longer a candidate, or an unreadable cache file, is retuned (the latter with a
    warning). The file is rewritten through a temporary file and a rename, merged with what
    other processes wrote meanwhile.
    """

    def __init__(self, timer=_bench_ms, cache_path=autotune_cache_path):
        self.timer = timer  # ms of one call of a zero-argument function
        self.cache_path = cache_path  # () -> Path | None
        self.cache: dict[tuple, BlockConfig] = {}

    def _read_disk(self, path: Path) -> dict[str, dict]:
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION \
                    or not isinstance(data.get("entries"), dict):
                raise ValueError(f"not a version-{_CACHE_VERSION} autotune cache")
            return data["entries"]
        except (OSError, ValueError) as error:  # JSONDecodeError is a ValueError
            warnings.warn(f"flash_attention autotune cache {path} is unreadable ({error}); "
                          f"retuning (it is rewritten; {CACHE_ENV}=off disables it)",
                          RuntimeWarning, stacklevel=4)
            return {}

    def _from_disk(self, key: tuple, candidates: list[BlockConfig]) -> BlockConfig | None:
        path = self.cache_path()
        if path is None:
            return None
        entry = self._read_disk(path).get(_key_text(key))
        try:
            config = BlockConfig(**entry) if isinstance(entry, dict) else None
        except (TypeError, ValueError):  # a hand-edited or foreign entry: retune
            config = None
        return config if config in candidates else None

    def _write_disk(self, key: tuple, config: BlockConfig) -> None:
        path = self.cache_path()
        if path is None:
            return
        try:
            entries = self._read_disk(path)
            entries[_key_text(key)] = asdict(config)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as file:
                    json.dump({"version": _CACHE_VERSION, "entries": entries}, file, indent=1,
                              sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as error:  # read-only home, full disk: keep the in-memory choice
            warnings.warn(f"flash_attention autotune: cannot write {path} ({error}); the tiles "
                          "are tuned again in the next process", RuntimeWarning, stacklevel=4)

    def lookup(self, key: tuple, candidates: list[BlockConfig]) -> BlockConfig | None:
        """The cached choice (memory, then disk), or None; nothing is timed."""
        if key not in self.cache:
            config = self._from_disk(key, candidates)
            if config is None:
                return None
            self.cache[key] = config
        return self.cache[key]

    def choose(self, key: tuple, candidates: list[BlockConfig], launch,
               default: BlockConfig | None = None) -> BlockConfig:
        """The fastest of ``candidates``; ``default``, untimed, when memory runs out while
        timing (the timer flushes the GPU cache through a buffer of its own): an out-of-memory
        error is not a candidate's failure (and that choice is not written to disk)."""
        cached = self.lookup(key, candidates)
        if cached is not None:
            return cached
        skip = _candidate_errors()
        times, errors = {}, []
        for config in candidates:
            try:
                times[config] = self.timer(lambda config=config: launch(config))
            except torch.cuda.OutOfMemoryError:  # not the candidate's fault: stop timing
                torch.cuda.empty_cache()
                if default is None:
                    raise
                logger.warning("flash_attention autotune %s: out of memory while timing; "
                               "using the default tiles %s", key, default)
                self.cache[key] = default
                return default
            except skip as error:  # this candidate cannot run here: keep the others
                errors.append(error)
                logger.debug("flash_attention autotune %s: %s failed: %s", key, config, error)
        if not times:
            raise RuntimeError(f"flash_attention: no tile config could launch for {key}") \
                from errors[0]
        best = min(times, key=times.get)
        self.cache[key] = best
        self._write_disk(key, best)
        logger.info("flash_attention autotune %s: %s (%.3f ms of %d candidates)", key, best,
                    times[best], len(times))
        return best


_AUTOTUNER = _Autotuner()


def _device_name(device: torch.device) -> str:
    """The GPU model in the tuning key (tiles tuned on one model need not suit another)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _tuning_key(kernel: str, q: torch.Tensor, k_len: int, mode: int, has_seg: bool,
                has_bias: bool, has_dropout: bool = False) -> tuple:
    bucket = _length_bucket(max(q.shape[2], k_len))
    return (kernel, mode, has_seg, has_bias, has_dropout, q.shape[-1], q.dtype, bucket,
            _device_name(q.device), f"triton {triton.__version__}")


def _block_config(kernel: str, explicit: BlockConfig | None, q: torch.Tensor, k_len: int,
                  mode: int, has_seg: bool, has_bias: bool, launch=None,
                  has_dropout: bool = False) -> BlockConfig:
    """The config one launch uses: explicit > MEGARCH_FLASH_CONFIG > autotuned (GPU) > default.

    With ``launch`` None nothing is timed: a config not tuned yet reads as the default.
    """
    if explicit is not None:
        return explicit
    forced = forced_block_configs(os.environ.get(CONFIG_ENV, ""))
    if forced is not None and kernel in forced:
        return forced[kernel]
    default = default_block_config(kernel, q.shape[-1], q.dtype)
    if forced is None or not _tuning_available(q.device):
        return default
    key = _tuning_key(kernel, q, k_len, mode, has_seg, has_bias, has_dropout)
    candidates = candidate_block_configs(kernel, q.shape[-1], q.dtype)
    if launch is None:
        return _AUTOTUNER.lookup(key, candidates) or default
    return _AUTOTUNER.choose(key, candidates, launch, default)


def selected_block_configs(q: torch.Tensor, k_len: int, mode: int, *, has_segments: bool = False,
                           has_bias: bool = False, has_dropout: bool = False
                           ) -> dict[str, BlockConfig]:
    """The config each kernel would use now for such a call (tuned ones once a call ran)."""
    return {kernel: _block_config(kernel, None, q, k_len, int(mode), has_segments, has_bias,
                                  has_dropout=has_dropout)
            for kernel in KERNELS}

