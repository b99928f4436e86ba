"""Rank-aware logging and training metrics: console lines, tensorboard, a jsonl record.

- :func:`get_rank` and :class:`RankFilter`: only rank 0 logs below WARNING (every rank logs
  warnings and errors, tagged with its rank).
- :class:`MetricsWriter`: per step, one json line in ``{out_dir}/metrics.jsonl`` (every step,
  losses at full precision, so runs can be compared bit for bit); every ``log_every`` steps a
  concise console line through the logger and tensorboard scalars in ``{out_dir}/tb``, on rank 0
  only.
"""

from __future__ import annotations

import json
import logging
import math
import os

from megarch.atomic import atomic_file

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
"""Per-step records in the run's out_dir."""
TENSORBOARD_DIR = "tb"
"""Tensorboard event files in the run's out_dir."""


def get_rank() -> int:
    """This process's global rank (``RANK`` as set by torchrun; 0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


class RankFilter(logging.Filter):
    """Passes every record on rank 0, and warnings or worse (prefixed ``[rank N]``) elsewhere."""

    def __init__(self, rank: int | None = None):
        super().__init__()
        self.rank = get_rank() if rank is None else rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0:
            return True
        if record.levelno < logging.WARNING:
            return False
        record.msg = f"[rank {self.rank}] {record.msg}"
        return True


def setup_logging(level: int = logging.INFO, fmt: str = "%(message)s") -> None:
    """Console logging for a CLI: ``fmt`` on stdout, rank-filtered (see :class:`RankFilter`)."""
    import sys

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(RankFilter())
    handler._megarch_console = True  # replaced by the next call, other handlers are kept
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_megarch_console", False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def format_step(record: dict, total_steps: int) -> str:
    """The console line of one step's ``record`` (see :meth:`MetricsWriter.step`)."""
    mfu = record.get("mfu")
    parts = [
        f"step {record['step']}/{total_steps}",
        f"loss {record['loss']:.4f}",
        f"ce {record['ce']:.4f}",
        f"z {record['z_loss']:.3g}",
        f"lr {record['lr']:.3g}",
        f"gnorm {record['grad_norm']:.3g}",
        f"{_si(record['tokens_per_s'])} tok/s",
        f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a",
        f"seen {_si(record['tokens_seen'])} tok",
    ]
    if record.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    return " | ".join(parts)


class MetricsWriter:
    """Writes step metrics to ``metrics.jsonl``, the console and tensorboard (rank 0 only)."""

    def __init__(self, out_dir: str, total_steps: int, log_every: int, resume_step: int = 0,
                 tensorboard: bool = True):
        self.rank = get_rank()
        self.out_dir = out_dir
        self.total_steps = total_steps
        self.log_every = max(log_every, 1)
        self.path = os.path.join(out_dir, METRICS_FILE)
        self.tb_dir = os.path.join(out_dir, TENSORBOARD_DIR)
        self._tb = None
        self._file = None
        if self.rank != 0:
            return
        os.makedirs(out_dir, exist_ok=True)
        self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # e.g. a cluster image without tensorboard
                log.warning("no tensorboard logging (%s); metrics still go to %s", err,
                            self.path)
            else:
                self._tb = SummaryWriter(self.tb_dir, purge_step=resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a resumed run rewrites the steps after its checkpoint."""
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with atomic_file(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def step(self, record: dict) -> None:
        """Record one step: ``step``, ``loss``, ``ce``, ``z_loss``, ``lr``, ``grad_norm``,
        ``tokens_per_s``, ``mfu`` (or None), ``tokens_seen``, ``skipped``."""
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        if step % self.log_every and step != self.total_steps and not record.get("skipped"):
            return
        log.info(format_step(record, self.total_steps))
        if self._tb is not None:
            for key in ("loss", "ce", "z_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                        "tokens_seen"):
                value = record.get(key)
                if value is not None and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, step)

    def eval(self, step: int, valid_loss: float, valid_ce: float) -> None:
        """Record a validation loss."""
        if self._file is None:
            return
        log.info("step %d/%d | valid loss %.4f | valid ce %.4f", step, self.total_steps,
                 valid_loss, valid_ce)
        self._file.write(json.dumps({"step": step, "valid_loss": valid_loss,
                                     "valid_ce": valid_ce}) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.add_scalar("valid/loss", valid_loss, step)
            self._tb.add_scalar("valid/ce", valid_ce, step)

    def close(self) -> None:
        """Flush and close the files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(out_dir: str) -> list[dict]:
    """The training records (not validation ones) of ``metrics.jsonl``, in order."""
    path = os.path.join(out_dir, METRICS_FILE)
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if "loss" in r]
