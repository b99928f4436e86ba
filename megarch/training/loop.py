"""The training loop: accumulation, clipping, non-finite guards, validation, checkpoints, MFU.

One optimizer step reads the global batch as ``global_batch / micro_batch`` micro-batches, counts
the loss tokens of all of them first and divides every micro-batch's loss sums by that count
(``lm_loss(num_tokens=...)``), so the accumulated gradient is the gradient of the global batch's
token mean whatever the split. Before the update the loss and the gradients are checked: a NaN
or inf stops the run with a diagnostic naming the step and the first non-finite tensor
(``run.on_nonfinite=stop``) or skips the update (``skip``); either way the weights are never
touched by a non-finite step.

Parallelism (megarch.parallel): launched by torchrun (launch/), the trainer builds one
:class:`~megarch.parallel.context.ParallelContext` from ``parallel`` (gloo on CPU, NCCL on GPUs).
Data-parallel ranks read disjoint micro-batches of the same global batch; the loss token count is
summed over them first and the gradients summed once, over the accumulated micro-batches (each
bucket during the last backward, megarch.parallel.grad_reduce), so a DP run is the same
optimisation as one process with the same global batch. Tensor-parallel ranks hold shards of the
model (vocab-parallel loss); pipeline stages (every architecture; an encoder-decoder's encoder
output travels with the decoder's hidden states) hold runs of layers and run each global
batch's micro-batches in 1F1B or interleaved 1F1B order (megarch.parallel.pipeline_schedules).
Every layout takes the same path: the model is always built as this rank's stage
(megarch.model.build_stage; with ``pp`` 1 the whole model) and run by the same schedules, and
the gradient norm is always the TP- and pipeline-reduced one (one process: no reduction).
Only global rank 0 writes metrics and tensorboard. Checkpoints (megarch.training.checkpoint) are
one directory per step for the whole job, ``out_dir/checkpoints/step_N``: data-parallel rank 0
of each tensor-parallel rank and stage writes its shard files into it (every rank its RNG
states), and the step is published once all are written. A run resumes from a checkpoint of any
TP/PP layout (megarch.training.resume); tools/reshard_checkpoint.py converts one to another
layout offline.

Usage::

    from megarch.config.train import get_train_preset
    from megarch.training import Trainer

    result = Trainer(get_train_preset("cd_flm_tiny")).train()
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from megarch.config.overrides import ConfigError
from megarch.config.train import TrainConfig
from megarch.data.datasets import build_dataset
from megarch.data.loader import make_loader
from megarch.data.tokenizers import load_tokenizer
from megarch.model import build_stage, lm_loss, model_flops_per_token
from megarch.parallel.context import ParallelContext
from megarch.parallel.data_parallel import all_reduce_grads, any_over, sum_over, zero1
from megarch.parallel.grad_reduce import build_grad_reducer
from megarch.parallel.pipeline import forward_only, interleaved_one_f_one_b, one_f_one_b
from megarch.parallel.rng import dropout_seed
from megarch.parallel.tensor_parallel import clip_grad_norm, reduce_sequence_parallel_grads
from megarch.training.checkpoint import TrainState, is_own_checkpoint
from megarch.training.logging import MetricsWriter
from megarch.training.optim import build_optimizer, lr_at, set_lr
from megarch.training.resume import SHAPE_FIELDS, check_shapes
from megarch.training.run_checkpoints import resume_trainer, save_trainer, wait_for_save
from megarch.training.runtime import (
    batch_tokens,
    build_context,
    device_peak_flops,
    ensure_embedded_corpus,
    loss_fields,
    micro_batch_stream,
    resolve_device,
)
from megarch.training.runtime import iterate as _iterate
from megarch.training.signals import StopFlag

log = logging.getLogger(__name__)

__all__ = ["SHAPE_FIELDS", "NonFiniteError", "TrainResult", "Trainer", "build_context",
           "ensure_embedded_corpus", "resolve_device"]


class NonFiniteError(RuntimeError):
    """A NaN or inf loss or gradient with ``run.on_nonfinite=stop``; the message says where."""


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves."""

    state: TrainState
    """Where the run ended."""
    final_loss: float | None
    """The last step's training loss (None if no step ran)."""
    valid_loss: float | None
    """The last validation loss (None without validation)."""
    checkpoint: str | None
    """The last checkpoint written or loaded."""
    out_dir: str
    """The run's output directory."""
    tensorboard_dir: str
    """Where the tensorboard events are."""
    stopped_by_signal: bool = False
    """True when SIGTERM/SIGINT ended the run early (after saving)."""


def first_nonfinite(model: torch.nn.Module) -> str:
    """Names the first parameter, then the first gradient, holding a NaN or inf."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            return f"parameter {name}"
    for name, param in model.named_parameters():
        if param.grad is not None and not torch.isfinite(param.grad).all():
            return f"gradient of {name}"
    return "no parameter or gradient (the loss alone)"


class Trainer:
    """One training run of a :class:`TrainConfig` (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, ctx: ParallelContext | None = None):
        cfg.validate()  # a bad config is refused before any process group or corpus is built
        self.ctx = ctx or build_context(cfg)
        if self.ctx.is_main:
            ensure_embedded_corpus(cfg)
        self.ctx.barrier()
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        cfg.validate(tokenizer_vocab=self.tokenizer.vocab_size)  # now against the tokenizer
        self.cfg = cfg
        self.device = resolve_device(cfg.run.device)
        self.autocast = cfg.run.precision == "bf16" and self.device.type == "cuda"
        if cfg.run.precision == "bf16" and not self.autocast:
            log.warning("run.precision=bf16 applies on CUDA only: training in float32 on %s",
                        self.device)
        if cfg.run.deterministic and self.device.type == "cuda":
            # cuBLAS is deterministic only with a fixed workspace (set before its first use)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        random.seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        # dropout: one global stream per DP rank and stage, shared by the TP ranks (replicated
        # masks agree); split activations draw per-TP-rank masks from it (megarch.parallel.rng)
        torch.manual_seed(dropout_seed(cfg.run.seed, self.ctx))
        try:  # the weights come from the seed alone, the same at every layout
            self.model = self._build_model().train()
        except ValueError as err:  # a size tensor parallelism cannot split
            raise ConfigError(str(err)) from None
        self.tp_group = self.model.tp_group
        self.optimizer = build_optimizer(cfg.optim, self.model)
        if cfg.parallel.zero1 and self.ctx.dp > 1:
            self.optimizer = zero1(self.optimizer, self.ctx.dp_group,
                                   bucket_view=cfg.parallel.overlap_grad_reduce)
        self.grad_reducer = build_grad_reducer(self.model, self.optimizer, self.ctx, cfg.parallel)
        self.state = TrainState()
        self.checkpoint: str | None = None
        self.pending_save = None  # a checkpoint being written in the background
        self.train_data = build_dataset(cfg.data, self.tokenizer, "train",
                                        cfg.run.steps * cfg.run.global_batch)
        self.valid_data = None
        if cfg.run.eval_batches:
            self.valid_data = build_dataset(cfg.data, self.tokenizer, "valid",
                                            cfg.run.eval_batches * cfg.run.micro_batch)
        self.flops_per_token: float | None = None
        self.peak = device_peak_flops(cfg, self.device)

    def _build_model(self) -> torch.nn.Module:
        """This rank's stage (its tensor-parallel shard): the whole model when ``pp`` is 1."""
        parallel = self.cfg.parallel
        return build_stage(self.cfg.model, self.ctx, self.device, seed=self.cfg.run.seed,
                           virtual_stages=parallel.virtual_stages,
                           encoder_stages=parallel.encoder_stages)

    def resume(self) -> None:
        """Load the checkpoint ``run.resume`` names (auto: the newest in out_dir, if any), of
        any TP/PP layout (megarch.training.resume)."""
        resume_trainer(self)

    def _check_shapes(self, path: str) -> None:
        """Refuse a checkpoint whose model has other shapes, naming the fields."""
        check_shapes(path, self.cfg.model)

    @property
    def checkpoint_root(self) -> str:
        """Where the run's checkpoints live (``out_dir/checkpoints/step_N``): ``out_dir``."""
        return self.cfg.run.out_dir

    def lineage_record(self) -> dict | None:
        """What the checkpoint records of the run's history (``lineage.json``); None: nothing.
        Staged runs (finetuning, adaptation) override it."""
        return None

    def save_all(self) -> str:
        """Collective checkpoint of the current state: every rank calls it (ZeRO-1 state
        gathered, one shard set per TP rank and stage, published when complete; with
        ``run.async_save`` written in the background, complete after ``wait_for_save``)."""
        return save_trainer(self)

    def loss_of(self, logits: torch.Tensor, batch: dict, num_tokens: float) -> dict:
        """The loss dict of ``logits`` (this rank's vocab shard under TP) for ``batch``, its
        sums divided by the global batch's ``num_tokens``."""
        labels, mask = loss_fields(batch)
        return lm_loss(logits, labels, mask, self.cfg.model.z_loss, num_tokens=num_tokens,
                       tp_group=self.tp_group)

    def run_micro_batches(self, batches: list[dict], num_tokens: float, train: bool) -> list:
        """(loss, ce, z_loss) summed over ``batches`` run through this rank's stage by the
        pipeline schedule (1F1B, or interleaved 1F1B with virtual stages, when ``train``:
        gradients accumulate; one stage: forward and backward micro-batch by micro-batch), the
        same on every stage."""
        def loss_fn(logits, batch):
            return self.loss_of(logits, batch, num_tokens)

        schedule = forward_only
        if train:
            interleaved = self.model.virtual_stages > 1
            schedule = interleaved_one_f_one_b if interleaved else one_f_one_b
        results = schedule(self.model, batches, loss_fn,
                           torch.bfloat16 if self.autocast else None)
        sums = [float(sum(r[k].detach() for r in results)) if results else 0.0
                for k in ("loss", "ce", "z_loss")]
        return sum_over(sums, self.ctx.pp_group)  # only the last stage's are non-zero

    def _set_flops(self, batch: dict) -> None:
        if "encoder_tokens" in batch:
            self.flops_per_token = model_flops_per_token(
                self.cfg.model, encoder_len=batch["encoder_tokens"].shape[1],
                decoder_len=batch["decoder_tokens"].shape[1])
        else:
            self.flops_per_token = model_flops_per_token(self.cfg.model,
                                                         seq_len=batch["tokens"].shape[1])

    def train_step(self, micro_batches: list[dict], start: float | None = None) -> dict:
        """One optimizer step over the micro-batches of one global batch; the step's record.

        ``start`` (a ``time.perf_counter()``) is when the step began, data loading included;
        by default now. Throughput and MFU are measured from it.
        """
        start = time.perf_counter() if start is None else start
        step = self.state.step + 1
        batches = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()}
                   for b in micro_batches]
        if self.flops_per_token is None:
            self._set_flops(batches[0])
        local_tokens = float(sum(loss_fields(b)[1].sum().item() for b in batches))
        num_tokens = sum_over([local_tokens], self.ctx.dp_group)[0]  # of the global batch
        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_reducer is not None:  # buckets reduced as the last backward fills them
            self.grad_reducer.start(len(batches))
        totals = dict(zip(("loss", "ce", "z_loss"),
                          self.run_micro_batches(batches, max(num_tokens, 1.0), True),
                          strict=True))
        if self.ctx.sequence_parallel:  # the norms saw this rank's chunk of the sequence
            reduce_sequence_parallel_grads(self.model, self.tp_group)
        if self.grad_reducer is not None:
            self.grad_reducer.finish()
        else:
            all_reduce_grads(self.model, self.ctx.dp_group, self.cfg.parallel.grad_bucket_mb)
        totals = dict(zip(totals, sum_over([float(v) for v in totals.values()],
                                           self.ctx.dp_group), strict=True))
        lr = lr_at(self.cfg.optim, step, self.cfg.run.steps)
        grad_norm = self._clip_and_step(step, totals["loss"], lr)
        tokens = int(sum_over([float(sum(batch_tokens(b) for b in batches))],
                              self.ctx.dp_group)[0])
        self.state.step = step
        self.state.consumed_samples += self.cfg.run.global_batch
        self.state.tokens_seen += tokens
        seconds = time.perf_counter() - start
        tokens_per_s = tokens / max(seconds, 1e-9)
        # tokens are the whole job's (summed over DP): divide by every device's peak
        peak = self.peak * self.ctx.world_size if self.peak else None
        mfu = (self.flops_per_token * tokens_per_s / peak) if peak else None
        return {"step": step, **totals, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s, "mfu": mfu, "tokens_seen": self.state.tokens_seen,
                "skipped": grad_norm is None or not np.isfinite(grad_norm)}

    def _clip_and_step(self, step: int, loss: float, lr: float) -> float:
        """Check, clip and apply the gradients; returns the pre-clip norm (inf/nan if skipped)."""
        skip = self.model.duplicated_parameters  # counted on another stage
        zero = self.grad_reducer is not None and self.grad_reducer.sharded
        if zero:  # ZeRO-1: each rank holds its own parameters' summed gradients
            norm = self.grad_reducer.grad_norm(True, self.tp_group, self.ctx.pp_group, skip)
        else:
            norm = clip_grad_norm(self.model, 0.0, self.tp_group, self.ctx.pp_group, skip)
        if np.isfinite(loss) and np.isfinite(norm):
            if self.cfg.optim.clip_grad > 0 and zero:
                self.grad_reducer.clip(self.cfg.optim.clip_grad, norm, True)
            elif self.cfg.optim.clip_grad > 0:
                clip_grad_norm(self.model, self.cfg.optim.clip_grad, self.tp_group,
                               self.ctx.pp_group, skip, norm=norm)
            set_lr(self.optimizer, lr)
            self.optimizer.step()
            return norm
        where = first_nonfinite(self.model)
        message = (f"step {step}: non-finite training loss {loss} / gradient norm {norm}; "
                   f"first non-finite tensor: {where}")
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.run.on_nonfinite == "stop":
            raise NonFiniteError(message + " (weights left as they were after step "
                                 f"{step - 1}; lower optim.lr or set run.on_nonfinite skip)")
        self.state.skipped_steps += 1
        log.warning("%s: update skipped (%d skipped so far)", message, self.state.skipped_steps)
        return float("nan")

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float] | None:
        """Token-weighted (loss, ce) on ``run.eval_batches`` micro-batches of the valid split."""
        if self.valid_data is None:
            return None
        micro = self.cfg.run.micro_batch
        loader = make_loader(self.valid_data, micro, micro, num_workers=0)
        self.model.eval()
        sums, tokens = torch.zeros(2, dtype=torch.float64), 0.0
        for index, batch in enumerate(_iterate(loader)):
            if index >= self.cfg.run.eval_batches:
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            count = float(loss_fields(batch)[1].sum().item())
            loss, ce, _ = self.run_micro_batches([batch], max(count, 1.0), train=False)
            sums += torch.tensor([loss, ce], dtype=torch.float64) * count
            tokens += count
        self.model.train()
        loss, ce = (sums / max(tokens, 1.0)).tolist()
        return loss, ce

    def _micro_batches(self):
        return micro_batch_stream(self.train_data, self.cfg, self.ctx,
                                  self.state.consumed_samples, self.device)

    def train(self) -> TrainResult:
        """Resume if asked, train to ``run.steps``, save; return a :class:`TrainResult`."""
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(self.cfg.run.deterministic,
                                           warn_only=self.device.type == "cuda")
        try:
            return self._train()
        finally:
            torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)

    def _train(self) -> TrainResult:
        self.resume()
        run = self.cfg.run
        os.makedirs(run.out_dir, exist_ok=True)
        if self.ctx.is_main:
            with open(os.path.join(run.out_dir, "config.json"), "w", encoding="utf-8") as f:
                f.write(self.cfg.to_json())
        metrics = MetricsWriter(run.out_dir, run.steps, run.log_every, self.state.step)
        final_loss, valid, stopped = None, None, False
        try:
            if run.eval_at_start and self.state.step < run.steps and not is_own_checkpoint(
                    self.checkpoint, run.out_dir):
                valid = self._eval(metrics)
            with StopFlag() as stop:
                batches = self._micro_batches() if self.state.step < run.steps else iter(())
                step_start = time.perf_counter()
                for micro_batches in batches:
                    record = self.train_step(micro_batches, step_start)
                    metrics.step(record)
                    final_loss = record["loss"]
                    step = self.state.step
                    if run.eval_every and step % run.eval_every == 0 and step < run.steps:
                        valid = self._eval(metrics)
                    stopping = any_over(bool(stop), self.ctx.world_group)
                    if stopping or step >= run.steps or (run.save_every and step % run.save_every
                                                         == 0):
                        self.save_all()
                    if stopping or step >= run.steps:
                        stopped = stopping
                        break
                    step_start = time.perf_counter()  # validation and saving not counted
            if not stopped and run.eval_batches:
                valid = self._eval(metrics)
        finally:
            try:  # a save in flight completes before the run ends (SIGTERM included)
                wait_for_save(self)
            finally:
                metrics.close()
        return TrainResult(self.state, final_loss, valid[0] if valid else None, self.checkpoint,
                           run.out_dir, metrics.tb_dir, stopped)

    def _eval(self, metrics: MetricsWriter) -> tuple[float, float] | None:
        result = self.evaluate()
        if result is not None:
            metrics.eval(self.state.step, *result)
        return result
