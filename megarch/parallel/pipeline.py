"""Pipeline parallelism for the decoder-only models: per-stage modules and a 1F1B schedule.

Each stage builds only its own layers (:class:`DecoderStage`): the first stage the embedding
and its run of blocks, the last its blocks, the final norm and the output projection. With tied
embeddings the last stage holds a copy of the embedding (used as the output projection) and the
two copies' gradients are summed over ``ctx.embed_group`` after the backward pass, so they stay
equal (Megatron's embedding group). Parameter names are the single-process model's
(``blocks.<global index>...``), so a full state dict loads into a stage by name.

Every stage reads the same micro-batches (the sample fields: positions, segment ids, prefix
lengths, labels); only the hidden states [batch, len, d_model] travel between stages, by
explicit point-to-point sends (:func:`one_f_one_b`). Combined send/receive pairs, as Megatron's
``send_forward_recv_backward``, keep neighbouring stages from both sending at once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megarch.config.model import ModelConfig
from megarch.model.attention import MaskMode
from megarch.model.blocks import SelfAttentionBlock
from megarch.model.layers import RMSNorm
from megarch.model.transformer import _default_positions, _LanguageModel
from megarch.parallel.collectives import all_reduce_tensors
from megarch.parallel.context import ParallelContext


def stage_layers(n_layers: int, pp: int, pp_rank: int) -> range:
    """The global indices of the blocks of stage ``pp_rank`` (as even a split as possible)."""
    base, extra = divmod(n_layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


class DecoderStage(_LanguageModel):
    """One pipeline stage of :class:`~megarch.model.transformer.DecoderLM` (CD or ND)."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext):
        super().__init__(cfg, ctx)
        if cfg.is_encoder_decoder:
            raise ValueError("DecoderStage needs arch causal_decoder or nonc_decoder")
        if ctx.sequence_parallel:
            raise ValueError("sequence parallelism with pipeline stages is not yet supported")
        self.first, self.last = ctx.is_first_stage, ctx.is_last_stage
        if not (self.first or (self.last and cfg.tie_embeddings)):
            self.embed = None  # a middle stage, or a last stage with its own lm_head
        if not self.last:
            self.lm_head = None
        self.mask_mode = MaskMode.CAUSAL if cfg.arch == "causal_decoder" else MaskMode.PREFIX
        layers = stage_layers(cfg.n_layers, ctx.pp, ctx.pp_rank)
        self.blocks = nn.ModuleDict({
            str(i): SelfAttentionBlock(cfg, cfg.decoder_rel_bidirectional, tp_group=self.tp_group)
            for i in layers
        })
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if self.last else None

    def forward(self, batch: dict, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """First stage: hidden states from ``batch["tokens"]``; others from ``hidden``
        [batch, len, d_model]. Returns hidden states, or on the last stage the logits."""
        tokens = batch["tokens"]
        positions = _default_positions(tokens, batch.get("positions"))
        segment_ids = batch.get("segment_ids")
        prefix = None
        if self.mask_mode == MaskMode.PREFIX:
            prefix = batch.get("prefix_len")
            prefix = prefix if prefix is not None else tokens.new_zeros(tokens.shape[0])
        x = self.dropout(self.embed_tokens(tokens)) if self.first else hidden
        for block in self.blocks.values():
            x = self.run_block(block, x, self.mask_mode, positions, segment_ids, prefix)
        if self.last:
            return self.logits(self.dropout(self.final_norm(x)))  # [batch, len, vocab]
        return x  # [batch, len, d_model]

    @property
    def duplicated_parameters(self) -> frozenset[str]:
        """Names whose gradient another stage also holds (the last stage's tied embedding):
        skip them when summing gradient norms over the pipeline."""
        if self.last and not self.first and self.embed is not None:
            return frozenset({"embed.weight"})
        return frozenset()

    def reduce_tied_embedding_grads(self) -> None:
        """Sum the embedding gradients of the first and last stage (tied embeddings)."""
        if self.ctx.embed_group is not None and self.embed is not None and self.ctx.pp > 1:
            if self.embed.weight.grad is None:
                self.embed.weight.grad = torch.zeros_like(self.embed.weight)
            all_reduce_tensors([self.embed.weight.grad], self.ctx.embed_group)


def build_stage(cfg: ModelConfig, ctx: ParallelContext,
                device: torch.device | str = "cpu") -> DecoderStage:
    """This rank's stage, built on the meta device and initialised on ``device`` (collective
    under pipeline parallelism: the last stage's tied embedding starts as the first stage's)."""
    with torch.device("meta"):
        stage = DecoderStage(cfg, ctx)
    stage.to_empty(device=device)
    stage.init_weights()
    if ctx.embed_group is not None and stage.embed is not None and ctx.pp > 1:
        with torch.no_grad():
            dist.broadcast(stage.embed.weight, src=ctx.stage_rank(0), group=ctx.embed_group)
    return stage


def _p2p(ops: list[tuple[str, torch.Tensor, int]]) -> None:
    """Post sends and receives together and wait for all of them."""
    if not ops:
        return
    p2p = [dist.P2POp(dist.isend if kind == "send" else dist.irecv, tensor, peer)
           for kind, tensor, peer in ops]
    for work in dist.batch_isend_irecv(p2p):
        work.wait()


class _Peers:
    """The neighbouring stages' global ranks and the micro-batch hidden-state buffers."""

    def __init__(self, stage: DecoderStage):
        ctx = stage.ctx
        self.prev = None if ctx.is_first_stage else ctx.stage_rank(ctx.pp_rank - 1)
        self.next = None if ctx.is_last_stage else ctx.stage_rank(ctx.pp_rank + 1)
        self.d_model = stage.cfg.d_model
        self.device = next(stage.parameters()).device

    def buffer(self, batch: dict) -> torch.Tensor:
        """An empty hidden state [batch, len, d_model] for ``batch``."""
        return torch.empty(*batch["tokens"].shape, self.d_model, device=self.device)


def one_f_one_b(stage: DecoderStage, micro_batches: list[dict], loss_fn) -> list[dict]:
    """Forward and backward ``micro_batches`` through the pipeline, 1F1B order (PipeDream-Flush:
    ``pp - stage - 1`` warm-up forwards, then one forward / one backward, then the remaining
    backwards). Every stage of the pipeline calls it with the same micro-batches.

    ``loss_fn(logits, batch)`` (last stage) returns a dict with a scalar ``loss`` to
    back-propagate (normalise it over all micro-batches yourself). Gradients accumulate in the
    stage's parameters, tied-embedding gradients summed across first and last stage. Returns
    the ``loss_fn`` results on the last stage, [] elsewhere.
    """
    peers = _Peers(stage)
    first, last = peers.prev is None, peers.next is None
    inputs: list[torch.Tensor | None] = []
    outputs: list[torch.Tensor] = []
    results: list[dict] = []

    def forward(m: int, x: torch.Tensor | None) -> torch.Tensor:
        out = stage(micro_batches[m], x)
        if last:
            results.append(loss_fn(out, micro_batches[m]))
            out = results[-1]["loss"]
        inputs.append(x)
        outputs.append(out)
        return out

    def backward(m: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        outputs[m].backward(grad)
        outputs[m] = None  # free the graph's outputs early
        x = inputs[m]
        return None if x is None else x.grad

    def receive_input(m: int) -> torch.Tensor | None:
        if first:
            return None
        x = peers.buffer(micro_batches[m])
        _p2p([("recv", x, peers.prev)])
        return x.requires_grad_()

    total = len(micro_batches)
    warmup = min(stage.ctx.pp - stage.ctx.pp_rank - 1, total)
    for m in range(warmup):
        out = forward(m, receive_input(m))
        _p2p([("send", out.detach(), peers.next)])
    x = receive_input(warmup) if warmup < total else None
    for i in range(total - warmup):
        out = forward(warmup + i, x)
        grad = None if last else peers.buffer(micro_batches[i])  # of the oldest output
        if not last:  # send this output, receive the gradient of the oldest one
            _p2p([("send", out.detach(), peers.next), ("recv", grad, peers.next)])
        grad_in = backward(i, grad)
        if first:
            continue
        if i == total - warmup - 1:
            _p2p([("send", grad_in, peers.prev)])
        else:
            x = peers.buffer(micro_batches[warmup + i + 1])
            _p2p([("send", grad_in, peers.prev), ("recv", x, peers.prev)])
            x.requires_grad_()
    for m in range(total - warmup, total):
        grad = peers.buffer(micro_batches[m])
        _p2p([("recv", grad, peers.next)])
        grad_in = backward(m, grad)
        if not first:
            _p2p([("send", grad_in, peers.prev)])
    stage.reduce_tied_embedding_grads()
    return results


@torch.no_grad()
def forward_only(stage: DecoderStage, micro_batches: list[dict], loss_fn) -> list[dict]:
    """Forward ``micro_batches`` through the pipeline without gradients (evaluation); returns
    the ``loss_fn(logits, batch)`` results on the last stage, [] elsewhere."""
    peers = _Peers(stage)
    results = []
    for batch in micro_batches:
        x = None
        if peers.prev is not None:
            x = peers.buffer(batch)
            _p2p([("recv", x, peers.prev)])
        out = stage(batch, x)
        if peers.next is None:
            results.append(loss_fn(out, batch))
        else:
            _p2p([("send", out, peers.next)])
    return results
