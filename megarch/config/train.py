"""The training config: model, data, optimizer, run and parallelism sections, and study presets.

One :class:`TrainConfig` holds everything a run needs. It comes from a named preset
(:func:`get_train_preset`), optionally a JSON file holding any subset of the sections, and dotted
command-line overrides, in that order (:func:`load_train_config`)::

    megarch-train --preset cd_flm_tiny --config my.json --model.n_layers 4 --run.steps 50

Presets (PAPER.md): ``cd_flm``, ``cd_mlm``, ``nd_plm``, ``nd_mlm``, ``ed_plm``, ``ed_mlm`` are the
study's six architecture/objective pairs at full scale (Adafactor, 1/sqrt(max(step, 1e4)),
2048 x 626 tokens, 131,072 steps, z-loss 1e-4, dropout 0). ``<pair>_tiny`` trains the same pair
on a CPU in about a minute: 100 steps of 16 x 128 tokens on the embedded corpus (``data/stdlib``,
built on first use).

Multitask finetuning (MTF, PAPER.md): ``cd_mtf``, ``nd_mtf``, ``ed_mtf`` finetune a pretrained
model of that architecture (``--run.init_from CKPT``) on prompted (inputs, targets) datasets:
Adafactor at a constant 1e-3, dropout 0.1, inputs 1024 / targets 256 packed, 10,000 steps of
1024 rows (~13B tokens), datasets blended by example count capped at 500k (``data.mixture_cap``;
list one prefix per dataset in ``data.paths``). ``<arch>_mtf_tiny`` is the same on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from megarch.config.data import DataConfig
from megarch.config.model import ModelConfig
from megarch.config.overrides import ConfigError, apply_overrides
from megarch.config.presets import T5_V1_1, get_model_preset, study_model, tiny_model

OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("inverse_sqrt", "cosine", "constant")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
NONFINITE = ("stop", "skip")
EMBEDDED_DIR = "data"
"""Directory of the embedded corpus: the tiny presets train on ``data/stdlib``."""
VOCAB_MULTIPLE = 128
"""``model.vocab_size = 0`` means the tokenizer's vocabulary padded up to a multiple of this."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (see megarch.training.optim)."""

    name: str = "adamw"
    """adafactor (the study's; megarch.training.adafactor: torch's algorithm, exact under TP) or
    adamw."""
    lr: float = 3e-3
    """Peak learning rate. Adafactor caps it at 1/sqrt(step) itself, so lr=0.01 with the
    constant schedule is the study's 1/sqrt(max(step, 1e4))."""
    schedule: str = "constant"
    """inverse_sqrt (linear warm-up, then lr * sqrt(warmup / step)), cosine (linear warm-up,
    then cosine decay to lr * min_lr_ratio at decay_steps) or constant (warm-up, then lr)."""
    warmup_steps: int = 0
    """Steps of linear warm-up from lr / warmup_steps to lr (0: none)."""
    decay_steps: int = 0
    """Cosine: the step where the decay ends (0: run.steps)."""
    min_lr_ratio: float = 0.1
    """Cosine: the final learning rate as a fraction of lr."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW; Adafactor multiplies it by lr)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW's (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0: no clipping; the study clips updates only)."""
    adafactor_decay: float = -0.8
    """Adafactor: second-moment decay exponent, beta2_t = 1 - t^decay (the study's -0.8)."""
    adafactor_clip: float = 1.0
    """Adafactor: update clipping threshold d (RMS of the update capped at d)."""
    adafactor_scale_eps: float = 1e-3
    """Adafactor: parameter scaling, step = rho_t * max(this, RMS(param))."""

    def validate(self) -> None:
        """Refuse impossible settings with the field names and the fix."""
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name={self.name!r}: use one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule={self.schedule!r}: use one of {SCHEDULES}")
        if not self.lr > 0 or self.lr == float("inf"):  # NaN from a --config fails too
            raise ConfigError(f"optim.lr={self.lr}: must be a finite number > 0")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ConfigError("optim.warmup_steps and optim.decay_steps must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas}: give two values in [0, 1)")
        if self.clip_grad < 0 or self.weight_decay < 0:
            raise ConfigError("optim.clip_grad and optim.weight_decay must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")


@dataclass
class RunConfig:
    """How long, how big a batch, where to write, how often to log, evaluate and save."""

    steps: int = 100
    """Optimizer steps to train for (a resumed run continues to this total)."""
    micro_batch: int = 8
    """Samples per forward/backward pass on one device."""
    global_batch: int = 8
    """Samples per optimizer step; gradient accumulation = global / (micro * dp)."""
    out_dir: str = "runs/default"
    """Checkpoints (``checkpoints/step_*``), tensorboard (``tb``) and ``metrics.jsonl``."""
    log_every: int = 10
    """Steps between progress lines (and tensorboard points)."""
    eval_every: int = 0
    """Steps between validation losses on the valid split (0: only at the end)."""
    eval_batches: int = 4
    """Micro-batches of the valid split per validation (0: no validation)."""
    eval_at_start: bool = False
    """Also validate before the first step (the loss curve's first point: the study's speed-ups
    start there), except when resuming this run's own checkpoint."""
    save_every: int = 0
    """Steps between checkpoints (0: only at the end and on SIGTERM/SIGINT)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted (0: keep all)."""
    async_save: str = "auto"
    """Write checkpoints in the background (true): the state is copied to host memory at the
    step and training goes on while the files are written (megarch.training.checkpoint); at
    most one save in flight, published atomically as a synchronous one. auto: true on CUDA,
    false on CPU, where the weights already live in host memory and the copy costs about what
    the write does (tools/bench_checkpoint.py: async stall 1.15x the synchronous one, 34M
    parameters + AdamW, 2 cores)."""
    resume: str = "auto"
    """auto (the newest complete checkpoint in out_dir, if any), none, or a checkpoint path."""
    seed: int = 1234
    """Seed of the model init and of dropout (the data order is data.seed)."""
    precision: str = "fp32"
    """fp32, or bf16 (autocast on CUDA; ignored with a warning on CPU)."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""
    on_nonfinite: str = "stop"
    """A NaN/inf loss or gradient: stop (with a diagnostic) or skip the step."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device for MFU (0: from the GPU's name; no MFU on CPU)."""
    deterministic: bool = True
    """torch.use_deterministic_algorithms while training: bit-exact reruns and resumes on CPU
    (e.g. the position-bias gather's backward is otherwise thread-order dependent); on CUDA
    in warn-only mode, as some kernels have no deterministic version."""
    init_from: str = ""
    """A checkpoint (or a run's out_dir: its newest) whose weights start this run, e.g. MTF
    from a pretrained model; used only when there is nothing to resume in out_dir. Recorded in
    the checkpoints' lineage.json (megarch.training.adapt)."""
    init_keep_step: bool = False
    """With init_from: also continue its step, tokens seen and optimizer state, so the schedule
    goes on from the restored step (adaptation's default; the data position restarts, as the
    samples are new); False: weights only, a fresh optimizer and step 0."""

    def validate(self) -> None:
        """Refuse impossible settings with the field names and the fix."""
        if self.init_keep_step and not self.init_from:
            raise ConfigError("run.init_keep_step=true needs run.init_from (a checkpoint path)")
        for name in ("steps", "micro_batch", "global_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"run.{name}={getattr(self, name)}: must be >= 1")
        for name in ("log_every", "eval_every", "eval_batches", "save_every", "keep_last"):
            if getattr(self, name) < 0:
                raise ConfigError(f"run.{name}={getattr(self, name)}: must be >= 0")
        if self.async_save not in ("auto", "true", "false"):
            raise ConfigError(f"run.async_save={self.async_save!r}: use auto, true or false")
        if self.global_batch % self.micro_batch:
            raise ConfigError(
                f"run.global_batch={self.global_batch} is not divisible by "
                f"run.micro_batch={self.micro_batch}: make it a multiple"
            )
        for name, allowed in (("precision", PRECISIONS), ("device", DEVICES),
                              ("on_nonfinite", NONFINITE)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"run.{name}={getattr(self, name)!r}: use one of {allowed}")
        if not self.resume:
            raise ConfigError("run.resume is empty: use auto, none or a checkpoint path")


@dataclass
class ParallelConfig:
    """Model and data parallelism (tensor, pipeline, data); see megarch.parallel.

    Launch ``tp * pp * dp`` processes with torchrun (launch/); a plain ``python -m`` run is one
    process. Ranks are laid out TP fastest, then DP, then PP.
    """

    tp: int = 1
    """Tensor-parallel size: heads, feed-forward units and vocabulary split over tp ranks."""
    pp: int = 1
    """Pipeline-parallel size: the layers split over pp stages (1F1B; encoder blocks on the
    first stages, decoder blocks on the later ones for encoder-decoders)."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved 1F1B, Megatron's virtual stages): rank r
    holds chunks r, r + pp, ...; > 1 needs pp > 1, decoder-only n_layers divisible by
    pp * virtual_stages and micro-batches per step (global / (micro * dp)) a multiple of pp."""
    encoder_stages: int = 0
    """Encoder-decoder pipelines: how many of the pp * virtual_stages virtual stages hold encoder
    blocks, the rest holding decoder blocks (0: automatic, in proportion to the layer counts)."""
    dp: int = 0
    """Data-parallel size (0: auto, WORLD_SIZE // (tp * pp))."""
    zero1: bool = False
    """Shard the optimizer state over the data-parallel ranks (ZeRO stage 1)."""
    grad_bucket_mb: float = 25.0
    """The data-parallel gradient all-reduce packs gradients into buckets of this many MiB
    (the extra memory it needs); a larger gradient is reduced on its own, in place."""
    overlap_grad_reduce: bool = True
    """Reduce each gradient bucket during the last micro-batch's backward, as soon as it is
    final (megarch.parallel.grad_reduce; under ZeRO-1 reduced to its owner only); false:
    all-reduce everything after the backward."""
    grad_reduce_dtype: str = "fp32"
    """With overlap_grad_reduce: ``fp32`` or ``bf16`` (buckets sent in bfloat16, half the
    traffic; the accumulation over micro-batches and the optimizer stay float32)."""
    sequence_parallel: bool = False
    """With tp > 1: norms, dropout and residuals hold len / tp tokens per rank (Megatron-SP);
    sequence lengths must divide by tp. Not with pp > 1 yet."""
    timeout_s: float = 300.0
    """Collective timeout: a rank waiting this long on a dead peer fails instead of hanging."""

    def validate(self) -> None:
        """Refuse sizes that do not fit the launched processes or are not supported yet."""
        for name in ("tp", "pp", "virtual_stages"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)}: must be >= 1")
        if self.encoder_stages < 0:
            raise ConfigError(f"parallel.encoder_stages={self.encoder_stages}: must be >= 0 "
                              "(0: automatic)")
        if self.virtual_stages > 1 and self.pp == 1:
            raise ConfigError(f"parallel.virtual_stages={self.virtual_stages} with "
                              "parallel.pp=1: interleaving needs a pipeline; set pp > 1 or "
                              "virtual_stages 1")
        if self.dp < 0 or self.timeout_s <= 0:
            raise ConfigError("parallel.dp must be >= 0 (0: auto) and parallel.timeout_s > 0")
        if not self.grad_bucket_mb > 0:
            raise ConfigError(f"parallel.grad_bucket_mb={self.grad_bucket_mb}: must be > 0 "
                              "(MiB per gradient all-reduce bucket; 25 is DDP's default)")
        if self.grad_reduce_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"parallel.grad_reduce_dtype={self.grad_reduce_dtype!r}: fp32 or "
                              "bf16")
        if self.grad_reduce_dtype == "bf16" and not self.overlap_grad_reduce:
            raise ConfigError("parallel.grad_reduce_dtype=bf16 needs parallel.overlap_grad_reduce"
                              " true (the post-backward all-reduce sends float32)")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world % (self.tp * self.pp):
            raise ConfigError(
                f"WORLD_SIZE={world} processes do not split into parallel.tp={self.tp} x "
                f"parallel.pp={self.pp}: launch a multiple of tp * pp processes"
            )
        if self.dp and self.dp * self.tp * self.pp != world:
            raise ConfigError(
                f"parallel.dp={self.dp} x tp={self.tp} x pp={self.pp} != WORLD_SIZE={world}: "
                "set parallel.dp 0 (auto) or launch dp * tp * pp processes"
            )

    def validate_pipeline(self, model: ModelConfig, run: RunConfig) -> None:
        """Refuse a pipeline layout the model or the batch cannot fill (pp > 1 only)."""
        n = self.pp * self.virtual_stages
        if self.pp == 1:
            if self.encoder_stages:
                raise ConfigError(f"parallel.encoder_stages={self.encoder_stages} with "
                                  "parallel.pp=1: set it 0 (no pipeline)")
            return
        if model.rel_bias_shared:
            raise ConfigError(f"model.rel_bias_shared=true with parallel.pp={self.pp}: a "
                              "stage without a stack's first layer would lack its bias table; "
                              "use parallel.pp=1 (tensor parallelism works)")
        if not model.is_encoder_decoder:
            if self.encoder_stages:
                raise ConfigError(f"parallel.encoder_stages={self.encoder_stages} with "
                                  f"model.arch={model.arch}: only encoder-decoders have "
                                  "encoder stages; set it 0")
            if model.n_layers < n or (self.virtual_stages > 1 and model.n_layers % n):
                raise ConfigError(f"model.n_layers={model.n_layers} does not split into "
                                  f"parallel.pp x virtual_stages = {n} equal stages: change "
                                  "one of them")
        else:
            enc, dec, e = model.n_layers, model.decoder_layers, self.encoder_stages
            if enc + dec < n or (e and not (1 <= e < n and e <= enc and n - e <= dec)):
                raise ConfigError(
                    f"parallel.encoder_stages={e} with parallel.pp x virtual_stages = {n}: "
                    f"every stage needs a block of the {enc} encoder / {dec} decoder layers "
                    "(set encoder_stages 0 for the automatic split, or change pp)")
        accumulation = run.global_batch // (run.micro_batch * self.data_parallel_size())
        if self.virtual_stages > 1 and accumulation % self.pp:
            raise ConfigError(
                f"parallel.virtual_stages={self.virtual_stages}: interleaved 1F1B needs a "
                f"multiple of parallel.pp={self.pp} micro-batches per step, got {accumulation} "
                f"(run.global_batch={run.global_batch} / (run.micro_batch={run.micro_batch} x "
                f"dp={self.data_parallel_size()})): change the batch sizes")

    def data_parallel_size(self) -> int:
        """The resolved data-parallel size (``dp``, or WORLD_SIZE // (tp * pp) when 0)."""
        return self.dp or max(1, int(os.environ.get("WORLD_SIZE", "1")) // (self.tp * self.pp))


@dataclass
class TrainConfig:
    """Everything one training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The network (megarch.config.model)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The samples (megarch.config.data)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    run: RunConfig = field(default_factory=RunConfig)
    """Length, batch, outputs, logging, checkpoints."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel sizes."""

    def resolve_vocab(self, tokenizer_vocab: int) -> None:
        """Set ``model.vocab_size = 0`` to the tokenizer's vocabulary padded to 128."""
        if self.model.vocab_size == 0:
            self.model.vocab_size = -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def validate(self, tokenizer_vocab: int | None = None) -> TrainConfig:
        """Check every section and the conflicts between them; return self.

        ``tokenizer_vocab`` (the tokenizer's vocabulary) also resolves ``model.vocab_size = 0``
        and refuses an embedding smaller than the tokenizer.
        """
        if tokenizer_vocab is not None:
            self.resolve_vocab(tokenizer_vocab)
        model = self.model
        if model.vocab_size == 0:  # resolved later, once the tokenizer is loaded
            model = dataclasses.replace(model, vocab_size=VOCAB_MULTIPLE)
        model.validate()
        self.data.validate()
        self.optim.validate()
        self.run.validate()
        self.parallel.validate()
        model.validate_tp(self.parallel.tp)
        self.parallel.validate_pipeline(self.model, self.run)
        self._validate_cross(tokenizer_vocab)
        return self

    def _validate_cross(self, tokenizer_vocab: int | None) -> None:
        arch, layout, objective = self.model.arch, self.data.layout, self.data.objective
        if arch == "encoder_decoder" and objective == "flm":
            raise ConfigError(
                "model.arch=encoder_decoder with data.objective=flm: full language modeling has "
                "no inputs for the encoder; use data.objective plm or mlm"
            )
        if arch == "encoder_decoder" and layout != "encoder_decoder":
            raise ConfigError(
                f"model.arch=encoder_decoder needs data.layout=encoder_decoder (got {layout!r})"
            )
        if arch != "encoder_decoder" and layout != "decoder":
            raise ConfigError(
                f"model.arch={arch} needs data.layout=decoder (got {layout!r}); "
                "data.layout=encoder_decoder is for model.arch=encoder_decoder"
            )
        if tokenizer_vocab is not None and self.model.vocab_size < tokenizer_vocab:
            raise ConfigError(
                f"model.vocab_size={self.model.vocab_size} is smaller than the tokenizer's "
                f"vocabulary ({tokenizer_vocab}, data.tokenizer={self.data.tokenizer!r}): "
                "raise it, or set model.vocab_size 0 for the tokenizer's padded to 128"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able data."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The config as indented JSON (what is saved beside each checkpoint)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def apply_dict(config: Any, values: dict[str, Any], where: str = "") -> Any:
    """Set the fields of dataclass ``config`` from a (nested) dict; unknown keys are refused."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"{name}: unknown field; known: {', '.join(sorted(fields))}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a section (an object), got {value!r}")
            apply_dict(current, value, name)
        else:
            setattr(config, key, value)
    return config


def _study(arch: str, objective: str) -> TrainConfig:
    """A study pair at full scale (PAPER.md)."""
    model = study_model(arch)
    model.dropout, model.z_loss = 0.0, 1e-4
    layout = "encoder_decoder" if arch == "encoder_decoder" else "decoder"
    ed_plm = arch == "encoder_decoder" and objective == "plm"
    return TrainConfig(
        model=model,
        data=DataConfig(paths=["data/c4"], tokenizer="data/spiece.model", objective=objective,
                        layout=layout, seq_len=626),
        # torch's Adafactor takes min(lr, 1/sqrt(t)): lr 0.01 = 1/sqrt(max(step, 1e4)).
        optim=OptimConfig(name="adafactor", lr=0.01, schedule="constant", clip_grad=0.0),
        run=RunConfig(steps=131072, micro_batch=8, global_batch=1024 if ed_plm else 2048,
                      out_dir=f"runs/{_short(arch)}_{objective}", log_every=100,
                      eval_every=1000, eval_batches=16, save_every=1000, keep_last=3,
                      precision="bf16", deterministic=False),  # speed over bit-exact reruns
    )


def _tiny(arch: str, objective: str) -> TrainConfig:
    """A study pair small enough to train on a CPU in about a minute."""
    model = tiny_model(arch)
    model.vocab_size = 0  # the tokenizer's, padded to 128
    layout = "encoder_decoder" if arch == "encoder_decoder" else "decoder"
    return TrainConfig(
        model=model,
        data=DataConfig(paths=[f"{EMBEDDED_DIR}/stdlib"],
                        tokenizer=f"{EMBEDDED_DIR}/stdlib_sp.model", objective=objective,
                        layout=layout, seq_len=128, num_workers=0),
        # 1e-2 rather than 3e-3: with T5's unit-variance embeddings a tiny model learns
        # visibly faster (60 steps: loss 8.3 -> 6.1 vs 8.3 -> 6.9 at 3e-3).
        optim=OptimConfig(name="adamw", lr=1e-2, schedule="cosine", warmup_steps=10,
                          weight_decay=0.01, clip_grad=1.0),
        run=RunConfig(steps=100, micro_batch=8, global_batch=16,
                      out_dir=f"runs/{_short(arch)}_{objective}_tiny", log_every=10,
                      eval_every=50, eval_batches=4, save_every=50, keep_last=2),
    )


def _mtf(arch: str) -> TrainConfig:
    """Multitask finetuning of a pretrained ``arch`` model at the study's scale (PAPER.md)."""
    cfg = _study(arch, "multitask")
    cfg.model.dropout = 0.1
    cfg.data.paths = ["data/p3_d4_train"]  # one prefix per prompted dataset of the mixture
    cfg.data.mixture_cap = 500_000
    cfg.data.inputs_len, cfg.data.targets_len = 1024, 256
    cfg.optim.lr = 1e-3  # constant: Adafactor's min(lr, 1/sqrt(t)) is 1e-3 from step 1
    cfg.run.steps, cfg.run.global_batch = 10_000, 1024
    cfg.run.out_dir = f"runs/{_short(arch)}_mtf"
    return cfg


def _mtf_tiny(arch: str) -> TrainConfig:
    """Multitask finetuning of a tiny ``arch`` model on a CPU (give ``--run.init_from`` and
    ``--data.paths``: prompted jsonl preprocessed with ``--json-keys inputs targets``)."""
    cfg = _tiny(arch, "multitask")
    cfg.model.dropout = 0.1
    cfg.data.paths = [f"{EMBEDDED_DIR}/prompted_tiny"]
    cfg.data.mixture_cap = 500_000
    cfg.data.inputs_len, cfg.data.targets_len = 96, 32
    # the study's optimizer and constant schedule; 1e-2 as the tiny pretraining presets (the
    # tiny model's small parameter RMS makes Adafactor's relative steps small)
    cfg.optim = OptimConfig(name="adafactor", lr=1e-2, schedule="constant", clip_grad=0.0)
    cfg.run.out_dir = f"runs/{_short(arch)}_mtf_tiny"
    return cfg


def _t5_mtf(model_preset: str) -> TrainConfig:
    """The study's multitask finetuning (:func:`_mtf`) of a T5 v1.1 size or its decoder-only
    pair (megarch.config.presets), e.g. from ``megarch-convert from-hf`` of
    ``google/t5-base-lm-adapt``."""
    model = get_model_preset(model_preset)
    cfg = _mtf(model.arch)
    model.dropout = cfg.model.dropout
    cfg.model = model
    cfg.run.out_dir = f"runs/{model_preset}_mtf"
    return cfg


def _short(arch: str) -> str:
    return {"causal_decoder": "cd", "nonc_decoder": "nd", "encoder_decoder": "ed"}[arch]


STUDY_PAIRS = (
    ("cd_flm", "causal_decoder", "flm"),
    ("cd_mlm", "causal_decoder", "mlm"),
    ("nd_plm", "nonc_decoder", "plm"),
    ("nd_mlm", "nonc_decoder", "mlm"),
    ("ed_plm", "encoder_decoder", "plm"),
    ("ed_mlm", "encoder_decoder", "mlm"),
)
"""(preset name, model.arch, data.objective) of the study's six pairs."""


def _train_presets() -> dict[str, Callable[[], TrainConfig]]:
    table: dict[str, Callable[[], TrainConfig]] = {}
    for name, arch, objective in STUDY_PAIRS:
        table[name] = lambda a=arch, o=objective: _study(a, o)
        table[f"{name}_tiny"] = lambda a=arch, o=objective: _tiny(a, o)
    for short, arch in (("cd", "causal_decoder"), ("nd", "nonc_decoder"),
                        ("ed", "encoder_decoder")):
        table[f"{short}_mtf"] = lambda a=arch: _mtf(a)
        table[f"{short}_mtf_tiny"] = lambda a=arch: _mtf_tiny(a)
    for size in T5_V1_1:
        for short in ("ed", "cd", "nd"):
            table[f"{short}_t5_v1_1_{size}_mtf"] = lambda m=f"{short}_t5_v1_1_{size}": _t5_mtf(m)
    return table


TRAIN_PRESETS: tuple[str, ...] = tuple(_train_presets())
"""Every training preset name."""


def get_train_preset(name: str) -> TrainConfig:
    """A fresh :class:`TrainConfig` for preset ``name`` (see :data:`TRAIN_PRESETS`)."""
    table = _train_presets()
    if name not in table:
        raise ConfigError(f"unknown training preset {name!r}: use one of {', '.join(table)}")
    return table[name]()


def load_train_config(
    preset: str | None = None, config_file: str | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """Preset (default: the plain defaults), then a JSON file of sections, then dotted
    ``--section.field VALUE`` overrides; validated (without the tokenizer check)."""
    config = get_train_preset(preset) if preset else TrainConfig()
    if config_file:
        try:
            with open(config_file, encoding="utf-8") as f:
                values = json.load(f)
        except OSError as err:
            raise ConfigError(f"--config {config_file}: {err.strerror}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"--config {config_file}: not valid UTF-8 (byte {err.start}); save "
                              "it as UTF-8 JSON") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"--config {config_file}: not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"--config {config_file}: expected a JSON object of sections")
        apply_dict(config, values)
    apply_overrides(config, overrides or [])
    return config.validate()


def config_from_json(text: str) -> TrainConfig:
    """The :class:`TrainConfig` saved by :meth:`TrainConfig.to_json`."""
    return apply_dict(TrainConfig(), json.loads(text))
