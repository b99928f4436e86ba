"""tools/estimate_memory.py: parameter counts per rank against the models' real shards, and the
activation figures against the bytes tiny models really save for the backward pass.

Measurement: one micro-batch forward (and loss) of a tiny model on CPU under
``torch.autograd.graph.saved_tensors_hooks``, each storage counted once; parameters and the
batch's own tensors are not activations and are left out; bf16 copies of weights (autocast) are
counted apart. With activation checkpointing the checkpoint keeps its blocks' inputs itself
(outside the hooks), so those are counted from the arguments ``run_block`` receives. Settings:
float32 with the PyTorch attention (the CPU path), bf16 autocast with the attention kernel (the
CUDA path; here through the Triton interpreter, which computes wrong bf16 values but saves the
same tensors), and both with dropout 0.1 (the kernel draws attention dropout in place; CPU
dropout masks have the input's dtype where CUDA's are bytes, which the estimator is told).
TP2 runs on real gloo processes.
"""

from __future__ import annotations

import os

import pytest
import torch

from megarch.config.model import ModelConfig
from megarch.config.presets import tiny_model
from megarch.config.train import OptimConfig
from megarch.model import PipelineLayout, build_model, build_stage, lm_loss, pipeline_layout
from megarch.parallel import partition_dims
from megarch.parallel.context import ParallelContext
from megarch.parallel.spawn import spawn
from megarch.training.optim import build_optimizer
from tools.estimate_memory import (
    _optimizer_bytes,
    activation_bytes,
    chunk_activation_bytes,
    estimate,
    parameters_per_rank,
    pipeline_rank_peak,
    stage_parameters,
)

TOLERANCE = 0.05
"""Estimated activation bytes within 5% of the measured ones (they agree within 2%)."""
ARCHS = ("causal_decoder", "nonc_decoder", "encoder_decoder")
ENC_LEN, DEC_LEN, ED_DEC_LEN, MICRO = 32, 32, 16, 2


@pytest.mark.parametrize("kv_heads, shared_bias", [(None, False), (4 // 2, False),
                                                   (None, True)])
@pytest.mark.parametrize("arch", ["causal_decoder", "encoder_decoder"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_parameters_per_rank_match_the_tp_shards(arch, tp, kv_heads, shared_bias):
    if kv_heads is not None and kv_heads % tp:
        pytest.skip("tp must divide model.n_kv_heads")
    cfg = tiny_model(arch)
    cfg.n_kv_heads = kv_heads
    cfg.rel_bias_shared = shared_bias  # one bias table per stack
    model = build_model(cfg, "meta")
    dims = partition_dims(model)
    shard = sum(p.numel() // (tp if dims[n] is not None else 1)
                for n, p in model.named_parameters())
    assert parameters_per_rank(cfg, tp) == shard


PIPELINES = [("encoder_decoder", 2, 1, 0), ("encoder_decoder", 4, 1, 0),
             ("encoder_decoder", 2, 2, 0), ("encoder_decoder", 4, 1, 1),
             ("encoder_decoder", 4, 1, 3), ("causal_decoder", 2, 2, 0),
             ("nonc_decoder", 4, 1, 0)]
"""(arch, pp, virtual_stages, encoder_stages) of the pipeline checks: encoder-decoders at PP2
and PP4 (automatic and explicit encoder stages) and interleaved PP2 x 2."""


def _pipeline_model(arch: str, tie: bool = True) -> ModelConfig:
    """The tiny model with 3 + 3 (encoder-decoder) or 4 layers: every layout above fits."""
    cfg = tiny_model(arch)
    cfg.n_layers = 3 if arch == "encoder_decoder" else 4
    if arch == "encoder_decoder":
        cfg.n_decoder_layers = 3
    cfg.tie_embeddings = tie
    return cfg


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize(("arch", "pp", "virtual", "encoder"), PIPELINES)
def test_stage_parameters_match_the_real_stages(arch, pp, virtual, encoder, tie):
    """Per pipeline rank, the estimate equals the TP1 and TP2 shards of the stage the trainer
    builds (on the meta device: no memory)."""
    cfg = _pipeline_model(arch, tie)
    for tp in (1, 2):
        real = []
        for rank in range(pp):
            stage = build_stage(cfg, ParallelContext(pp=pp, rank=rank), "meta",
                                virtual_stages=virtual, encoder_stages=encoder)
            dims = partition_dims(stage)
            real.append(sum(p.numel() // (tp if dims[n] is not None else 1)
                            for n, p in stage.named_parameters()))
        assert stage_parameters(cfg, tp, pp, virtual, encoder) == real
        assert parameters_per_rank(cfg, tp, pp, virtual, encoder) == max(real)


@pytest.mark.parametrize(("pp", "virtual"), [(2, 1), (4, 1), (2, 2), (4, 2), (2, 3)])
def test_pipeline_in_flight_micro_batches_follow_megatron(pp, virtual):
    """Rank 0's most forwards awaiting their backward: pp under 1F1B; under interleaved 1F1B
    Megatron's warm-up 2 (pp - 1) + (v - 1) pp plus one, or all of them with pp micro-batches.
    With one byte per chunk the peak is that count."""
    layout = PipelineLayout(pp, virtual, 0, tuple(range(1) for _ in range(pp * virtual)))
    for n_micro in (pp, 2 * pp, 4 * pp):
        ones = [1.0] * (pp * virtual)
        peak, _, _, most = pipeline_rank_peak(layout, 0, n_micro, ones, [0.0] * len(ones))
        if virtual == 1:
            want, want_last = pp, 1
        elif n_micro == pp:
            want = want_last = n_micro * virtual
        else:
            want = 2 * (pp - 1) + (virtual - 1) * pp + 1
            want_last = (virtual - 1) * pp + 1
        assert (most, peak) == (want, want)
        last = pipeline_rank_peak(layout, pp - 1, n_micro, ones, [0.0] * len(ones))[3]
        assert last == want_last


def _chunk_forward(stage, batch: dict, chunk: int):
    """A forward of ``stage``'s chunk as the schedule runs it: inputs received as leaves that
    need a gradient; the loss on the last stage. Returns the tensors the schedule holds."""
    def forward() -> list[torch.Tensor]:
        virtual = stage.chunks[chunk]
        gen = torch.Generator().manual_seed(virtual)
        inputs = tuple(torch.randn(shape, generator=gen).requires_grad_()
                       for shape in stage.input_shapes(virtual, batch))
        out = stage.run_stage(batch, inputs, chunk)
        if virtual == stage.last_virtual:
            labels = batch.get("labels", batch.get("decoder_labels"))
            mask = batch.get("loss_mask", batch.get("decoder_loss_mask"))
            lm_loss(out, labels, mask)
            return list(inputs)
        return [*inputs, *out]
    return forward


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize(("arch", "pp", "virtual", "encoder"),
                         [("encoder_decoder", 2, 2, 0), ("causal_decoder", 2, 2, 0)])
def test_chunk_activation_estimate_matches_saved_tensors(arch, pp, virtual, encoder, ckpt,
                                                         monkeypatch):
    """Every virtual stage of an interleaved PP2 x 2 pipeline (the encoder-decoder's: encoder
    chunks, the first decoder chunk that embeds, a middle one that carries the encoder output,
    the last with the loss), one micro-batch, float32 with the PyTorch attention: saved
    tensors plus what the schedule holds (inputs, outputs) within 5% of the estimate."""
    monkeypatch.setenv("MEGARCH_ATTENTION", "reference")
    cfg = _pipeline_model(arch)
    cfg.activation_checkpointing = ckpt
    layout = pipeline_layout(cfg, pp, virtual, encoder)
    batch = _batch(arch)
    enc, dec = (ENC_LEN, ED_DEC_LEN) if arch == "encoder_decoder" else (0, DEC_LEN)
    errors = []
    for rank in range(pp):
        torch.manual_seed(0)
        stage = build_stage(cfg, ParallelContext(pp=pp, rank=rank), "cpu",
                            virtual_stages=virtual, encoder_stages=encoder).train()
        for chunk, k in enumerate(stage.chunks):
            got = measure_saved_bytes(stage, batch, False, _chunk_forward(stage, batch, chunk))
            parts = chunk_activation_bytes(cfg, layout, k, enc, dec, MICRO, cuda=False)
            want = parts["blocks"] + parts["ends"] + parts["logits"] + parts["carried"]
            assert got["weight_copies"] == 0 and parts["weight_copies"] == 0
            if abs(want - got["activations"]) > TOLERANCE * got["activations"]:
                errors.append(f"virtual stage {k}: estimated {want:.0f}, measured "
                              f"{got['activations']}")
    assert not errors, "\n".join(errors)


def test_pipeline_estimate_reports_a_real_rank_and_one_all_reduce_bucket():
    """An interleaved encoder-decoder pipeline's estimate: the parameters of one of the
    trainer's ranks, the all-reduce transient one ``parallel.grad_bucket_mb`` bucket, and the
    trainer's refusals (sequence parallelism with stages; micro-batches not a multiple of pp
    under interleaving) as errors."""
    from megarch.config.train import get_train_preset

    est = estimate([], "ed_mlm", 2, 4, 8, True, virtual_stages=2)
    counts = stage_parameters(get_train_preset("ed_mlm").model, 2, 4, 2)
    assert round(est["parameters_per_rank_M"] * 1e6) in counts
    assert est["allreduce_GiB"] * 2**30 == 25 * 2**20
    wide = estimate(["--parallel.grad_bucket_mb", "100"], "ed_mlm", 2, 4, 8, True,
                    virtual_stages=2)
    assert wide["allreduce_GiB"] * 2**30 == 100 * 2**20
    assert estimate([], "ed_mlm", 2, 4, 1, True, virtual_stages=2)["allreduce_GiB"] == 0
    with pytest.raises(ValueError, match="sequence parallelism"):
        estimate([], "cd_flm", 2, 2, 8, True, sp=True)
    with pytest.raises(ValueError, match="multiple of pp=4 micro-batches"):
        estimate(["--run.global_batch", "48", "--run.micro_batch", "2"], "cd_flm", 1, 4, 8,
                 True, virtual_stages=2)


def test_zero1_divides_optimizer_state_and_tp_divides_weights():
    base = estimate([], "cd_flm", 1, 1, 8, zero1=False)
    zero = estimate([], "cd_flm", 1, 1, 8, zero1=True)
    tp2 = estimate(["--optim.name", "adamw"], "cd_flm", 2, 1, 4, zero1=False)
    adam = estimate(["--optim.name", "adamw"], "cd_flm", 1, 1, 8, zero1=True)
    assert zero["optimizer_GiB"] == pytest.approx(base["optimizer_GiB"] / 8)
    assert tp2["weights_GiB"] == pytest.approx(adam["weights_GiB"] / 2, rel=1e-3)
    assert 4.0 < base["parameters_per_rank_M"] / 1e3 < 5.5  # the study's 4.8B decoder
    assert base["step_PFLOP"] == pytest.approx(tp2["step_PFLOP"])


def test_sequence_lengths_of_the_study_presets():
    """The rows the samples give (PAPER.md): MLM's 568 raw tokens -> 512 inputs + 114 targets."""
    from megarch.config.train import get_train_preset
    from tools.estimate_memory import sequence_lengths

    want = {"cd_flm": (0, 626), "nd_mlm": (0, 626), "ed_plm": (626, 626), "ed_mlm": (512, 114),
            "ed_mtf": (1024, 256), "cd_mtf": (0, 1280)}
    assert {name: sequence_lengths(get_train_preset(name)) for name in want} == want


def _batch(arch: str) -> dict:
    """A packed batch as the samples give it: two segments with their own positions."""
    gen = torch.Generator().manual_seed(0)

    def fields(length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        segments = torch.ones(MICRO, length, dtype=torch.long)
        segments[:, length // 2:] = 2
        positions = torch.cat([torch.arange(length // 2), torch.arange(length - length // 2)])
        return torch.randint(0, 512, (MICRO, length), generator=gen), positions.expand(
            MICRO, length).clone(), segments

    if arch == "encoder_decoder":
        enc, enc_pos, enc_seg = fields(ENC_LEN)
        dec, dec_pos, dec_seg = fields(ED_DEC_LEN)
        return {"encoder_tokens": enc, "encoder_positions": enc_pos, "encoder_segment_ids": enc_seg,
                "decoder_tokens": dec, "decoder_positions": dec_pos, "decoder_segment_ids": dec_seg,
                "decoder_labels": dec.clone(), "decoder_loss_mask": torch.ones(MICRO, ED_DEC_LEN)}
    tokens, positions, segments = fields(DEC_LEN)
    return {"tokens": tokens, "positions": positions, "segment_ids": segments,
            "prefix_len": torch.full((MICRO,), 5), "labels": tokens.clone(),
            "loss_mask": torch.ones(MICRO, DEC_LEN)}


def _is_weight_copy(t: torch.Tensor) -> bool:
    """A cast (and transposed) parameter: autocast's bf16 copy of a weight."""
    fn = t.grad_fn
    for _ in range(4):
        if fn is None:
            return False
        if type(fn).__name__ == "AccumulateGrad":  # a parameter (not a stage's input leaf)
            return isinstance(fn.variable, torch.nn.Parameter)
        if type(fn).__name__ not in ("TBackward0", "ToCopyBackward0", "ViewBackward0"):
            return False
        fn = fn.next_functions[0][0]
    return False


def measure_saved_bytes(model: torch.nn.Module, batch: dict, bf16: bool,
                        forward=None) -> dict[str, int]:
    """{"activations": bytes, "weight_copies": bytes} kept for the backward of one forward
    (and loss). ``forward()`` replaces ``model(**batch)`` and the loss; it returns the tensors
    held beyond the saved ones (a pipeline schedule's chunk inputs and outputs), counted too."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {v.untyped_storage().data_ptr() for v in batch.values()}
    seen: dict[int, tuple[int, bool]] = {}

    def record(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = (storage.nbytes(), _is_weight_copy(t))
        return t

    original = model.run_block

    def run_block(block, *args):  # a checkpointed block keeps its inputs
        if model.cfg.activation_checkpointing:
            for arg in args:
                if isinstance(arg, torch.Tensor):
                    record(arg)
        return original(block, *args)

    model.run_block = run_block
    labels = batch.get("labels", batch.get("decoder_labels"))
    mask = batch.get("loss_mask", batch.get("decoder_loss_mask"))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t), autocast:
        if forward is None:
            logits = model(**batch)
            lm_loss(logits, labels, mask, tp_group=model.tp_group)["loss"]
        else:
            for t in forward():
                record(t)
    copies = sum(n for n, is_copy in seen.values() if is_copy)
    return {"activations": sum(n for n, _ in seen.values()) - copies, "weight_copies": copies}


SETTINGS = {"fp32_reference": (False, "reference"), "bf16_kernel": (True, "kernel"),
            "fp32_dropout": (False, "reference"), "bf16_dropout": (True, "kernel")}
"""name: (bf16 autocast, MEGARCH_ATTENTION); the dropout ones train with model.dropout 0.1 (with
the kernel, attention dropout too)."""


def _measure_all(rank: int, world: int, cases: list[tuple]) -> dict:
    """Measured bytes of each (arch, checkpointing, setting, tp, sp) case at this rank."""
    ctx2 = ParallelContext.build(tp=world)
    out = {}
    for arch, ckpt, setting, tp, sp in cases:
        if tp == 1 and rank != 0:
            continue
        bf16, path = SETTINGS[setting]
        os.environ["MEGARCH_ATTENTION"] = path
        cfg = tiny_model(arch)
        cfg.activation_checkpointing = ckpt
        cfg.dropout = 0.1 if setting.endswith("dropout") else 0.0
        ctx = ParallelContext.single() if tp == 1 else ctx2
        ctx.sequence_parallel = sp and tp > 1
        torch.manual_seed(0)
        model = build_model(cfg, "cpu", ctx).train()
        out[(arch, ckpt, setting, tp, sp)] = measure_saved_bytes(model, _batch(arch), bf16)
    return out


def _estimated(arch: str, ckpt: bool, setting: str, tp: int, sp: bool,
               kv_heads: int | None = None) -> dict[str, float]:
    cfg = tiny_model(arch)
    cfg.n_kv_heads = kv_heads
    cfg.activation_checkpointing = ckpt
    cfg.dropout = 0.1 if setting.endswith("dropout") else 0.0
    enc, dec = (ENC_LEN, ED_DEC_LEN) if arch == "encoder_decoder" else (0, DEC_LEN)
    bf16 = SETTINGS[setting][0]
    parts = activation_bytes(cfg, enc, dec, MICRO, tp=tp, sp=sp, bf16=bf16, flash=bf16,
                             cuda=False)
    return {"activations": parts["blocks"] + parts["ends"] + parts["logits"],
            "weight_copies": parts["weight_copies"]}


def _check(cases: list[tuple]) -> None:
    measured = {}
    for values in spawn(2)(_measure_all, cases):
        measured.update(values)
    errors = []
    for case in cases:
        got, want = measured[case], _estimated(*case)
        for part in ("activations", "weight_copies"):
            if abs(want[part] - got[part]) > TOLERANCE * max(got[part], 1):
                errors.append(f"{case} {part}: estimated {want[part]:.0f}, measured {got[part]}")
    assert not errors, "\n".join(errors)


def test_activation_estimate_matches_saved_tensors():
    """The CPU path (float32, PyTorch attention with its materialised scores, bias buckets and
    masks): every architecture at TP1 and TP2, with and without activation checkpointing. The
    CUDA path (bf16 autocast, the attention kernel): the decoder and the encoder-decoder at TP1
    and TP2; with dropout, one case of each precision (the rest of the matrix is the slow
    test's). One spawn for all: it is the cost."""
    fp32 = [(arch, ckpt, "fp32_reference", tp, False)
            for arch in ARCHS for ckpt in (False, True) for tp in (1, 2)]
    bf16 = [(arch, False, "bf16_kernel", tp, False)
            for arch in ("causal_decoder", "encoder_decoder") for tp in (1, 2)]
    dropout = [("encoder_decoder", False, "fp32_dropout", 1, False),
               ("causal_decoder", False, "bf16_dropout", 2, False)]
    _check(fp32 + bf16 + dropout)


@pytest.mark.parametrize("setting", ["fp32_reference", "bf16_kernel"])
@pytest.mark.parametrize("arch", ["causal_decoder", "encoder_decoder"])
def test_activation_estimate_matches_saved_tensors_with_multi_query(arch, setting, monkeypatch):
    """n_kv_heads 1 (TP1): the kernel saves k, v with one head; the reference path saves them
    repeated to every query head; the k/v weight copies shrink. The estimate is within the
    tolerance, and its change from multi-head attention is the measured change, to the byte."""
    bf16, path = SETTINGS[setting]
    monkeypatch.setenv("MEGARCH_ATTENTION", path)
    measured = {}
    for kv_heads in (None, 1):
        cfg = tiny_model(arch)
        cfg.n_kv_heads = kv_heads
        torch.manual_seed(0)
        measured[kv_heads] = measure_saved_bytes(build_model(cfg, "cpu").train(), _batch(arch),
                                                 bf16)
    got, want = measured[1], _estimated(arch, False, setting, 1, False, kv_heads=1)
    mha = _estimated(arch, False, setting, 1, False)
    assert want["weight_copies"] < mha["weight_copies"] or not bf16
    for part in ("activations", "weight_copies"):
        assert abs(want[part] - got[part]) <= TOLERANCE * max(got[part], 1), (part, want, got)
        assert mha[part] - want[part] == measured[None][part] - got[part], (part, measured)


@pytest.mark.slow
def test_activation_estimate_matches_saved_tensors_full_matrix():
    """Every setting and architecture, TP1 / TP2 / TP2 with sequence parallelism."""
    _check([(arch, ckpt, setting, tp, sp) for arch in ARCHS for ckpt in (False, True)
            for setting in SETTINGS for tp, sp in ((1, False), (2, False), (2, True))])


def test_gpu_check_one_billion_run_is_a_valid_config_that_fits():
    """tools/gpu_check.sh parses (bash -n); its ~1B run (ONE_B settings on cd_flm_tiny, whose
    embedded tokenizer has 8,000 ids padded to 8,064) validates, has ~1B parameters and fits
    an 80 GiB GPU by the estimator."""
    import re
    import shlex
    import subprocess

    from megarch.config.train import load_train_config
    from megarch.model.flops import config_parameter_count
    from tests.training.helpers import REPO
    from tools.estimate_memory import A100_GIB, FIT_FRACTION, estimate_config

    script = os.path.join(REPO, "tools", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    with open(script, encoding="utf-8") as f:
        text = f.read()
    overrides = shlex.split(re.search(r"^ONE_B=\((.*?)\)", text, re.M | re.S).group(1))
    assert '--preset cd_flm_tiny' in text and '"${ONE_B[@]}"' in text
    cfg = load_train_config("cd_flm_tiny", None, [*overrides, "--model.vocab_size", "8064"])
    assert 0.9e9 < config_parameter_count(cfg.model) < 1.2e9
    assert cfg.run.precision == "bf16"
    assert estimate_config(cfg, 1, 1, 1, False)["total_GiB"] < FIT_FRACTION * A100_GIB


@pytest.mark.parametrize("arch", ["causal_decoder", "encoder_decoder"])
@pytest.mark.parametrize("change", [{}, {"tie_embeddings": False}, {"rel_bias_shared": True},
                                    {"position": "rotary"}, {"n_kv_heads": 1}])
def test_adafactor_state_estimate_is_the_optimizers_to_the_byte(arch, change):
    """Adafactor's factored state as estimated (row + column moments per matrix, cross-attention
    of the decoder blocks included, full moments of the norms) equals the tensors a real step
    leaves in the optimizer's state."""
    cfg = tiny_model(arch)
    for name, value in change.items():
        setattr(cfg, name, value)
    model = build_model(cfg.validate(), seed=0)
    optimizer = build_optimizer(OptimConfig(name="adafactor"), model)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    measured = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                   for key, t in state.items() if key != "step")
    params = sum(p.numel() for p in model.parameters())
    assert _optimizer_bytes(cfg, "adafactor", params, tp=1) == measured
