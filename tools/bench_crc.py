#!/usr/bin/env python3
"""CRC32C benchmark: the TFRecord reader's checksum with google-crc32c against the fallbacks.

Prints, side by side in one run on the same random records (P3-like sizes: a few hundred bytes
to a few kB each), MB/s of

1. google-crc32c's C extension (what ``megarch-data p3`` uses when the wheel is installed);
2. megarch's numpy fallback (``crc32c_many_numpy``, batched as the reader batches records);
3. google-crc32c's own pure-Python fallback (``google_crc32c.python``), when importable;

with each one's ratio to the numpy fallback, after checking that all give the same CRCs. Then
the reader end to end (``read_records`` with every CRC checked) on a TFRecord file of the same
records, under each backend.

Usage: python tools/bench_crc.py [--records 4096] [--trials 3] [--python-records 256]
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import tempfile
import time
from collections.abc import Callable


def make_records(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(200, 4000)) for _ in range(n)]


def best_rate(fn: Callable[[], object], nbytes: int, trials: int) -> float:
    """MB/s of the fastest of ``trials`` calls (other load only ever slows a call down)."""
    best = float("inf")
    for _ in range(trials):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return nbytes / best / 1e6


def write_tfrecord(path: str, records: list[bytes]) -> None:
    from megarch.data.p3.tfrecord import masked_crc32c

    with open(path, "wb") as f:
        for data in records:
            length = struct.pack("<Q", len(data))
            f.write(length + struct.pack("<I", masked_crc32c(length)))
            f.write(data + struct.pack("<I", masked_crc32c(data)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=4096, help="records per timed pass")
    parser.add_argument("--trials", type=int, default=3, help="passes, best kept")
    parser.add_argument("--python-records", type=int, default=256,
                        help="records for the (slow) pure-Python fallback")
    args = parser.parse_args(argv)
    if args.records < 1 or args.trials < 1 or args.python_records < 1:
        parser.error("--records, --trials and --python-records must be >= 1")

    from megarch.data.p3 import tfrecord

    if tfrecord.CRC_BACKEND != "google-crc32c":
        parser.exit(2, "bench_crc.py: error: google-crc32c's C extension is not available "
                    "(pip install google-crc32c); nothing to compare the fallback with\n")
    from importlib.metadata import version

    records = make_records(args.records)
    nbytes = sum(map(len, records))
    fast = tfrecord.crc32c_many(records)
    if fast != tfrecord.crc32c_many_numpy(records):
        parser.exit(1, "bench_crc.py: error: google-crc32c and the numpy fallback disagree\n")
    rows = [
        ("google-crc32c (C)", best_rate(lambda: tfrecord.crc32c_many(records), nbytes,
                                        args.trials)),
        ("megarch numpy fallback", best_rate(lambda: tfrecord.crc32c_many_numpy(records),
                                             nbytes, args.trials)),
    ]
    try:
        from google_crc32c import python as google_python
    except ImportError:
        google_python = None
    if google_python is not None:
        few = records[: args.python_records]
        if [google_python.value(r) for r in few] != fast[: len(few)]:
            parser.exit(1, "bench_crc.py: error: google_crc32c.python disagrees\n")
        rows.append(("google-crc32c pure-Python fallback",
                     best_rate(lambda: [google_python.value(r) for r in few],
                               sum(map(len, few)), 1)))
    numpy_rate = rows[1][1]
    print(f"{len(records):,} records, {nbytes / 1e6:.1f} MB, google-crc32c "
          f"{version('google-crc32c')}, best of {args.trials}\n")
    print(f"{'CRC32C':<40} {'MB/s':>10} {'vs numpy':>10}")
    for name, rate in rows:
        print(f"{name:<40} {rate:>10,.1f} {rate / numpy_rate:>9.2f}x")

    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "bench.tfrecord")
        write_tfrecord(path, records)
        size = os.path.getsize(path)

        def read_all() -> None:
            for _ in tfrecord.read_records(path, verify=True):
                pass

        reader = {}
        saved = tfrecord._google_crc32c
        try:
            reader["google-crc32c"] = best_rate(read_all, size, args.trials)
            tfrecord._google_crc32c = None  # the reader as it runs without the wheel
            reader["numpy"] = best_rate(read_all, size, args.trials)
        finally:
            tfrecord._google_crc32c = saved
    print(f"\n{'read_records, every CRC checked':<40} {'MB/s':>10} {'vs numpy':>10}")
    for name, rate in reader.items():
        print(f"{name:<40} {rate:>10,.1f} {rate / reader['numpy']:>9.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
