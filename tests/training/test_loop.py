"""The training loop on the embedded corpus: losses fall, accumulation is exact, NaNs handled."""

from __future__ import annotations

import math

import pytest
import torch

from megarch.training import NonFiniteError, Trainer, read_metrics
from tests.training.helpers import fast_config

# All six study pairs: ~2 s each on an idle 2-core machine (mark slow if that changes; keep
# cd_flm and ed_mlm in the default run).
PAIRS = ["cd_flm_tiny", "cd_mlm_tiny", "nd_plm_tiny", "nd_mlm_tiny", "ed_plm_tiny", "ed_mlm_tiny"]


@pytest.mark.parametrize("preset", PAIRS)
def test_tiny_pair_learns_the_embedded_corpus(preset, embedded, tmp_path):
    steps = 30
    cfg = fast_config(preset, embedded, str(tmp_path), steps, run__eval_batches="2")
    result = Trainer(cfg).train()
    losses = [r["ce"] for r in read_metrics(str(tmp_path))]
    assert len(losses) == steps and result.state.step == steps
    # A model predicting uniformly scores ln(vocab); one that learnt the corpus's token
    # frequencies and more scores well below it, and well below where it started.
    uniform = math.log(2000)
    final = sum(losses[-5:]) / 5
    assert final < uniform - 0.5, losses
    assert final < losses[0] - 1.0, losses
    assert result.valid_loss is not None and result.valid_loss < uniform
    assert result.state.tokens_seen == steps * 8 * (128 if "ed_plm" in preset else 64)


def _one_step_parameters(embedded, out_dir, micro_batch: str):
    cfg = fast_config("nd_plm_tiny", embedded, out_dir, 1, run__micro_batch=micro_batch,
                      optim__name="adafactor", optim__schedule="constant", optim__lr="0.01",
                      optim__warmup_steps="0", run__resume="none")
    trainer = Trainer(cfg)
    trainer.train()
    return read_metrics(out_dir)[0], {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_gradient_accumulation_matches_one_big_batch(embedded, tmp_path):
    # Prefix-LM rows carry different numbers of loss tokens: averaging per micro-batch would
    # weigh tokens unequally; dividing by the global batch's count gives the big batch exactly.
    whole, params_whole = _one_step_parameters(embedded, str(tmp_path / "a"), "8")
    split, params_split = _one_step_parameters(embedded, str(tmp_path / "b"), "2")
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
    for name, value in params_whole.items():
        torch.testing.assert_close(params_split[name], value, rtol=1e-5, atol=1e-6)


class _NaNAtStep(Trainer):
    """Makes the loss of one step NaN; remembers the weights just before that step."""

    nan_step = 3

    def loss_of(self, logits, batch, num_tokens):
        out = super().loss_of(logits, batch, num_tokens)
        if self.state.step + 1 == self.nan_step:
            if not hasattr(self, "before"):
                self.before = {k: v.clone() for k, v in self.model.state_dict().items()}
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nonfinite_loss_stops_with_a_diagnostic(embedded, tmp_path):
    trainer = _NaNAtStep(fast_config("cd_flm_tiny", embedded, str(tmp_path), 5))
    with pytest.raises(NonFiniteError) as err:
        trainer.train()
    message = str(err.value)
    # every gradient is NaN: the first in parameter order is the embedding's
    assert "step 3:" in message and "gradient of embed.weight" in message
    assert trainer.state.step == 2
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, trainer.before[name]), name


def test_nonfinite_step_skipped_leaves_weights_unchanged(embedded, tmp_path):
    class _Stop(_NaNAtStep):
        def train_step(self, micro_batches, start=None):
            record = super().train_step(micro_batches, start)
            if record["step"] == self.nan_step:
                self.after = {k: v.clone() for k, v in self.model.state_dict().items()}
            return record

    cfg = fast_config("cd_flm_tiny", embedded, str(tmp_path), 5, run__on_nonfinite="skip")
    trainer = _Stop(cfg)
    result = trainer.train()
    assert result.state.step == 5 and result.state.skipped_steps == 1
    for name, value in trainer.after.items():
        assert torch.equal(value, trainer.before[name]), name
    records = read_metrics(str(tmp_path))
    assert [r["skipped"] for r in records] == [False, False, True, False, False]
    assert math.isfinite(records[-1]["loss"])
    adam_steps = {float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert adam_steps == {4.0}  # the skipped step never reached the optimizer


def test_embedded_corpus_is_built_on_first_use(tmp_path, monkeypatch):
    import megarch.training.runtime as runtime

    calls = []
    monkeypatch.setattr(runtime, "prepare_embedded", lambda d, **kw: calls.append(d))
    cfg = fast_config("cd_flm_tiny", (str(tmp_path / "stdlib"),
                                      str(tmp_path / "stdlib_sp.model")), str(tmp_path), 1)
    runtime.ensure_embedded_corpus(cfg)
    assert calls == [str(tmp_path)]
    cfg.data.paths = [str(tmp_path / "c4")]  # not the embedded corpus: left alone
    runtime.ensure_embedded_corpus(cfg)
    assert calls == [str(tmp_path)]


def test_bf16_on_cpu_falls_back_to_float32(embedded, tmp_path, caplog):
    cfg = fast_config("cd_flm_tiny", embedded, str(tmp_path), 1, run__precision="bf16",
                      run__device="cpu")
    trainer = Trainer(cfg)
    assert not trainer.autocast and "CUDA only" in caplog.text
    trainer.train()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_mfu_from_the_flop_count_and_throughput(embedded, tmp_path):
    from megarch.model import model_flops_per_token

    cfg = fast_config("cd_flm_tiny", embedded, str(tmp_path), 2, run__peak_tflops="0.5")
    Trainer(cfg).train()
    record = read_metrics(str(tmp_path))[-1]
    flops = model_flops_per_token(cfg.model, seq_len=64)  # vocab resolved by the Trainer
    assert record["mfu"] == pytest.approx(flops * record["tokens_per_s"] / 0.5e12, rel=1e-9)
    assert 0 < record["mfu"] < 1 and record["tokens_seen"] == 2 * 8 * 64


def _valid_records(out_dir: str) -> list[dict]:
    import json
    import os

    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, filter(str.strip, f)) if "valid_loss" in r]


def test_eval_at_start_validates_the_initial_model_once_and_rewinds_are_refused(embedded, tmp_path):
    out = str(tmp_path)
    cfg = fast_config("cd_flm_tiny", embedded, out, 2, run__eval_batches="2",
                      run__eval_at_start="true", run__save_every="1")
    trainer = Trainer(cfg)
    initial = trainer.evaluate()  # the untrained model: what the first record must hold
    trainer.train()
    records = _valid_records(out)
    assert [r["step"] for r in records] == [0, 2]
    assert records[0]["valid_loss"] == pytest.approx(initial[0], rel=1e-6)
    assert records[0]["valid_loss"] > records[1]["valid_loss"]
    # resuming the run's own checkpoint adds no second start point
    Trainer(fast_config("cd_flm_tiny", embedded, out, 3, run__eval_batches="2",
                        run__eval_at_start="true")).train()
    assert [r["step"] for r in _valid_records(out)] == [0, 2, 3]
    # resuming an older step of the same out_dir would interleave two histories: refused
    from megarch.config.overrides import ConfigError
    from megarch.training.checkpoint import step_path

    rewind = Trainer(fast_config("cd_flm_tiny", embedded, out, 3,
                                 run__resume=step_path(out, 2)))
    with pytest.raises(ConfigError, match="older than this run.out_dir's newest checkpoint"):
        rewind.resume()
