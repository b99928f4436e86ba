"""Where a run executes and what it reads: the device (and its peak FLOP/s for MFU), the
parallel context, the embedded corpus built on first use, and the stream of training
micro-batches.

The stream (:func:`micro_batch_stream`) restarts at any consumed-samples position (resume) and
leaves the global torch RNG untouched (:func:`iterate`), so resuming changes no dropout mask.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator

import torch

from megarch.config.overrides import ConfigError
from megarch.config.train import TrainConfig
from megarch.data.embedded import (
    EMBEDDED_PREFIX,
    EMBEDDED_TOKENIZER,
    is_prepared,
    prepare_embedded,
)
from megarch.data.loader import MicroBatchSampler
from megarch.model import peak_flops
from megarch.parallel.context import ParallelContext, init_distributed
from megarch.parallel.watchdog import start_watchdog
from megarch.training.signals import STOP_SIGNALS

log = logging.getLogger(__name__)


def ensure_embedded_corpus(cfg: TrainConfig) -> None:
    """Build the embedded corpus when ``data.paths`` names it (``<dir>/stdlib`` with the
    tokenizer ``<dir>/stdlib_sp.model``) and it does not exist yet."""
    if len(cfg.data.paths) != 1:
        return
    directory, name = os.path.split(cfg.data.paths[0])
    expected_tokenizer = os.path.join(directory, EMBEDDED_TOKENIZER)
    if name != EMBEDDED_PREFIX or os.path.normpath(cfg.data.tokenizer) != os.path.normpath(
        expected_tokenizer
    ):
        return
    if is_prepared(directory or "."):
        return
    log.info("building the embedded corpus in %s (first use)", directory or ".")
    prepare_embedded(directory or ".", progress=False)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is available: use auto or cpu")
    return torch.device(name)


def device_peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    """The dense bf16 peak FLOP/s MFU divides by: ``run.peak_tflops`` when set, else the CUDA
    device's (None on CPU or an unknown GPU: no MFU)."""
    if cfg.run.peak_tflops > 0:
        return cfg.run.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    try:
        return peak_flops()
    except ValueError as err:
        log.warning("no MFU: %s (set run.peak_tflops)", err)
        return None


def build_context(cfg: TrainConfig) -> ParallelContext:
    """The parallel context of this process: from torchrun's environment when launched by it
    (gloo for ``run.device`` cpu, else NCCL), else the single-process one. Every group
    waits at most ``parallel.timeout_s`` on a peer, and a peer watchdog ends the job when a
    rank stops answering (megarch.parallel.watchdog)."""
    backend = "gloo" if resolve_device(cfg.run.device).type == "cpu" else "nccl"
    if not init_distributed(backend, cfg.parallel.timeout_s):
        return ParallelContext.single()
    ctx = ParallelContext.build(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp or None,
                                cfg.parallel.sequence_parallel, cfg.parallel.timeout_s)
    ctx.watchdog = start_watchdog(ctx.rank, ctx.world_size, cfg.parallel.timeout_s)
    return ctx


def iterate(loader: torch.utils.data.DataLoader) -> Iterator:
    """``iter(loader)`` without touching the global torch RNG (a DataLoader draws its workers'
    base seed from it), so resuming, which starts a new iterator mid-run, changes no dropout."""
    with torch.random.fork_rng(devices=[]):
        return iter(loader)


def ignore_stop_signals(worker_id: int) -> None:
    """Data-loader workers ignore SIGTERM/SIGINT: a scheduler signals the whole process group,
    and the main process stops them itself after saving its checkpoint."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def micro_batch_stream(train_data: torch.utils.data.Dataset, cfg: TrainConfig,
                       ctx: ParallelContext, consumed_samples: int,
                       device: torch.device) -> Iterator[list[dict]]:
    """This data-parallel rank's micro-batches of each global batch from
    ``consumed_samples`` on, one list per optimizer step (forever)."""
    run, workers = cfg.run, cfg.data.num_workers
    sampler = MicroBatchSampler(len(train_data), run.micro_batch, run.global_batch,
                                ctx.dp_rank, ctx.dp, consumed_samples=consumed_samples)
    loader = torch.utils.data.DataLoader(
        train_data, batch_sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
        worker_init_fn=ignore_stop_signals if workers else None,
    )
    accumulation = sampler.accumulation_steps
    iterator = iterate(loader)
    while True:
        yield [next(iterator) for _ in range(accumulation)]


def loss_fields(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, loss mask) of a decoder-only or encoder-decoder batch."""
    if "decoder_labels" in batch:
        return batch["decoder_labels"], batch["decoder_loss_mask"]
    return batch["labels"], batch["loss_mask"]


def batch_tokens(batch: dict) -> int:
    """Input tokens of a batch (both sides for encoder-decoders)."""
    if "encoder_tokens" in batch:
        return batch["encoder_tokens"].numel() + batch["decoder_tokens"].numel()
    return batch["tokens"].numel()
