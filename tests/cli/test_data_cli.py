"""megarch-data end to end on the embedded corpus, as a user runs it."""

import json
import subprocess
import sys

import numpy as np
import pytest

from megarch.cli.data import main
from megarch.config.data import DataConfig
from megarch.data.datasets import build_dataset
from megarch.data.tokenizers import load_tokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    run = subprocess.run(
        [sys.executable, "-m", "megarch.data", "demo", "--dir", str(root), "--seq-len", "96",
         "--vocab-size", "2000", "--workers", "2", "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return root, run.stdout


def test_demo_shows_every_objective(demo):
    root, out = demo
    for name in ("stdlib.jsonl", "stdlib_sp.model", "stdlib_text_document.idx",
                 "stdlib_text_document.bin"):
        assert (root / name).exists()
    blocks = out.split("── sample")[1:]
    assert len(blocks) == 5
    titles = [b.splitlines()[0] for b in blocks]
    assert [t.split("·")[1].strip() for t in titles] == ["flm", "plm", "plm", "mlm", "mlm"]
    assert "‖" in blocks[1]  # the PLM prefix boundary is visible
    assert "segment 2" in blocks[2]  # encoder-decoder PLM pairs two rows
    assert "<extra_id_0>" in blocks[3] and "<extra_id_0>" in blocks[4]


def test_inspect_json_has_every_field(demo, capsys):
    root, _ = demo
    model = str(root / "stdlib_sp.model")
    args = ["inspect", "--data.paths", str(root / "stdlib"), "--data.tokenizer", model,
            "--data.objective", "mlm", "--data.layout", "encoder_decoder", "--data.seq_len", "96",
            "--start", "3", "--count", "2", "--json", "-q"]
    assert main(args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    cfg = DataConfig(paths=[str(root / "stdlib")], tokenizer=model, objective="mlm",
                     layout="encoder_decoder", seq_len=96)
    dataset = build_dataset(cfg, load_tokenizer(model), "train", 5)
    assert [r["index"] for r in records] == [3, 4]
    for record in records:
        expected = dataset[record.pop("index")]
        assert set(record) == set(expected)
        for key, value in record.items():
            assert np.array_equal(np.asarray(value), expected[key].numpy())


def test_errors_name_the_problem(tmp_path, capsys):
    code = main(["inspect", "--data.paths", str(tmp_path / "nothing"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "nothing" in err and "megarch-data preprocess" in err
    code = main(["inspect", "--data.objective", "flm", "--data.layout", "encoder_decoder",
                 "--data.paths", "x", "-q"])
    assert code == 2 and "no inputs for an encoder" in capsys.readouterr().err
    code = main(["preprocess", "--input", str(tmp_path / "*.jsonl"), "--output",
                 str(tmp_path / "o"), "--tokenizer", "bytes", "-q"])
    assert code == 2 and "*.jsonl" in capsys.readouterr().err


def test_preprocess_creates_missing_output_directories(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "hello"}\n', encoding="utf-8")
    out = tmp_path / "new" / "deeper" / "name"
    assert main(["preprocess", "--input", str(src), "--output", str(out),
                 "--tokenizer", "bytes", "--workers", "1", "-q"]) == 0
    assert (tmp_path / "new" / "deeper" / "name_text_document.bin").stat().st_size == 12  # 6 x u16


def test_preprocess_output_below_a_file_is_one_clear_error(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "hello"}\n', encoding="utf-8")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["preprocess", "--input", str(src), "--output", str(blocker / "sub" / "name"),
                 "--tokenizer", "bytes", "--workers", "1", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{blocker} is a file, not a directory" in err and "--output" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in.jsonl"]


def test_package_exports_the_entry_points():
    import megarch.data
    from megarch.data import datasets, loader

    assert megarch.data.build_dataset is datasets.build_dataset
    assert megarch.data.make_loader is loader.make_loader
    with pytest.raises(AttributeError, match="no_such"):
        megarch.data.no_such  # noqa: B018
