"""megarch-data p3: the TFRecord / Example reader, T0's mixture and eval tasks from P3 folders."""

from __future__ import annotations

import json
import os
import random

import pytest

from megarch.cli.data import main as data_main
from megarch.data.errors import DataError
from megarch.data.p3 import T0_EVAL, T0_TRAIN, crc32c, parse_example, prepare_p3, read_examples
from megarch.data.p3.tables import match_folders
from megarch.data.p3.tfrecord import read_records
from megarch.eval.tasks import load_task
from tests.data.p3_writer import (
    crc32c_bitwise,
    encode_example,
    prompted,
    protobuf_example_class,
    score_eval,
    write_task_folder,
    write_tfrecord,
)

FEATURES = {"text": ["héllo", b"\x00\xffraw"], "ids": [0, 1, 300, 2**40, -5],
            "floats": [0.5, -2.0, 1e-3], "flag": [True]}


def test_crc32c_matches_the_check_value_and_a_bitwise_reference():
    assert crc32c(b"123456789") == 0xE3069283  # the published CRC-32C check value
    rng = random.Random(0)
    # around the short path (< 64 bytes), whole 256-byte blocks and the tree of blocks
    for n in (0, 1, 4, 63, 64, 255, 256, 257, 1024, 1500, 5000):
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert crc32c(data) == crc32c_bitwise(data), n


def test_google_crc32c_and_the_numpy_fallback_agree():
    from megarch.data.p3 import tfrecord

    assert tfrecord.CRC_BACKEND == "google-crc32c"  # installed with megarch (setup.py)
    rng = random.Random(1)
    chunks = [rng.randbytes(n) for n in (0, 3, 4, 63, 64, 256, 257, 4000, 70000)]
    chunks += [rng.randbytes(rng.randint(0, 3000)) for _ in range(200)]
    expected = [crc32c_bitwise(c) for c in chunks[:9]]
    assert tfrecord.crc32c_many(chunks)[:9] == expected
    assert tfrecord.crc32c_many(chunks) == tfrecord.crc32c_many_numpy(chunks)
    assert [tfrecord.crc32c(c) for c in chunks] == [tfrecord.crc32c_numpy(c) for c in chunks]


def test_reader_without_google_crc32c_checks_the_same(tmp_path, monkeypatch):
    """The fallback path as it runs where the wheel is missing: good files read alike, a
    corrupt record is still caught."""
    from megarch.data.p3 import tfrecord

    path = str(tmp_path / "x.tfrecord")
    records = [encode_example({"text": [f"record {i}" * (i % 50)]}) for i in range(300)]
    write_tfrecord(path, records)
    fast = list(read_records(path))
    monkeypatch.setattr(tfrecord, "_google_crc32c", None)
    assert list(read_records(path)) == fast == records
    raw = bytearray(open(path, "rb").read())
    raw[-10] ^= 1  # a data byte of the last record
    open(path, "wb").write(bytes(raw))
    with pytest.raises(DataError, match="record 299: data CRC mismatch"):
        list(read_records(path))


def test_bench_crc_prints_the_ratio(capsys):
    from tools.bench_crc import main as bench_main

    assert bench_main(["--records", "64", "--trials", "1", "--python-records", "4"]) == 0
    out = capsys.readouterr().out
    assert "google-crc32c (C)" in out and "megarch numpy fallback" in out and "x\n" in out


@pytest.mark.parametrize("packed", [True, False])
def test_features_round_trip(tmp_path, packed):
    path = str(tmp_path / "x.tfrecord")
    records = [encode_example(FEATURES, packed), encode_example({"ids": [7]}, packed),
               encode_example({"long": ["x" * 3000]}, packed)]
    write_tfrecord(path, records)
    first, second, third = read_examples(path)
    assert first["text"] == ["héllo".encode(), b"\x00\xffraw"]
    assert first["ids"] == [0, 1, 300, 2**40, -5] and first["flag"] == [1]
    assert first["floats"] == pytest.approx([0.5, -2.0, 1e-3], rel=1e-6)
    assert second == {"ids": [7]} and third == {"long": [b"x" * 3000]}
    assert list(read_examples(path, features={"ids"}))[0] == {"ids": [0, 1, 300, 2**40, -5]}


def test_decoder_agrees_with_the_protobuf_package():
    pytest.importorskip("google.protobuf")
    proto = protobuf_example_class()()
    proto.features.feature["text"].bytes_list.value.extend([b"a", b"bc"])
    proto.features.feature["ids"].int64_list.value.extend([3, -1, 2**50])
    proto.features.feature["f"].float_list.value.extend([0.25, 4.0])
    assert parse_example(proto.SerializeToString()) == {
        "text": [b"a", b"bc"], "ids": [3, -1, 2**50], "f": [0.25, 4.0]}


def _three_records(tmp_path) -> tuple[str, bytes]:
    path = str(tmp_path / "x.tfrecord")
    write_tfrecord(path, [encode_example({"i": [i], "s": ["y" * 100]}) for i in range(3)])
    with open(path, "rb") as f:
        return path, f.read()


def test_corrupt_crc_names_the_file_and_record(tmp_path):
    path, raw = _three_records(tmp_path)
    size = len(raw) // 3
    corrupt = bytearray(raw)
    corrupt[2 * size + 20] ^= 1  # record 2's data
    with open(path, "wb") as f:
        f.write(corrupt)
    with pytest.raises(DataError, match=rf"{path}: record 2: data CRC mismatch"):
        list(read_examples(path))
    assert len(list(read_records(path, verify=False))) == 3  # unchecked, it reads through
    corrupt = bytearray(raw)
    corrupt[size + 1] ^= 1  # record 1's length
    with open(path, "wb") as f:
        f.write(corrupt)
    with pytest.raises(DataError, match=rf"{path}: record 1: length CRC mismatch"):
        list(read_examples(path))


def test_truncated_file_names_the_file_and_record(tmp_path):
    path, raw = _three_records(tmp_path)
    for cut, what in ((len(raw) - 10, "truncated data"), (2 * len(raw) // 3 + 5,
                                                          "truncated header")):
        with open(path, "wb") as f:
            f.write(raw[:cut])
        with pytest.raises(DataError, match=rf"{path}: record 2: {what}"):
            list(read_examples(path))


def test_non_example_record_is_refused(tmp_path):
    path = str(tmp_path / "x.tfrecord")
    write_tfrecord(path, [encode_example({"a": [1]}), b"\x0a\xff"])
    with pytest.raises(DataError, match=r"record 1: not a tf.train.Example"):
        list(read_examples(path))


def test_tables_cover_t0():
    assert len(T0_TRAIN) == 38 and len(T0_EVAL) == 11
    found = match_folders(["anli_GPT_3_style_r2", "anli_GPT_3_style_r2_score_eval",
                           "super_glue_cb_can_we_infer", "glue_qqp_same_thing"], T0_EVAL)
    assert found["anli_r2"] == {"GPT_3_style": ["anli_GPT_3_style_r2",
                                                "anli_GPT_3_style_r2_score_eval"]}
    assert found["cb"] == {"can_we_infer": ["super_glue_cb_can_we_infer"]}
    assert found["anli_r1"] == {} and found["rte"] == {}


CB = [("It rains. The street is wet?", "True"), ("Cats bark. Cats are loud?", "False"),
      ("A is B. B is C?", "Neither")]


def _p3(root) -> str:
    """A small P3 download: two training datasets, CB (two ranked prompts, one without labels,
    one with two choices instead of three, one generative),
    COPA through a _score_eval copy only, a folder of no T0 dataset."""
    data = str(root / "P3" / "data")
    write_task_folder(data, "glue_mrpc_same_thing", "train",
                      [prompted("Same? A / B", "yes"), prompted("Same? C / D", "no")])
    write_task_folder(data, "glue_mrpc_paraphrase", "train", [prompted("Para? A / B", "yes")])
    write_task_folder(data, "imdb_sentiment", "train",
                      [prompted("Great film.", "positive"), prompted("", "negative")],
                      completed=False)
    write_task_folder(data, "super_glue_cb_GPT_3_style", "validation",
                      [prompted(q, a, ["True", "False", "Neither"]) for q, a in CB])
    write_task_folder(data, "super_glue_cb_always_sometimes_never", "validation",
                      [prompted(f"{q} Always, sometimes or never?",
                                {"True": "Always", "False": "Never"}.get(a, "Sometimes"),
                                ["Always", "Sometimes", "Never"]) for q, a in CB])
    write_task_folder(data, "super_glue_cb_unlabelled", "validation",
                      [prompted(q, "<NO LABEL>", ["True", "False", "Neither"]) for q, _ in CB])
    write_task_folder(data, "super_glue_cb_is_it_true", "validation",
                      [prompted(q, "Yes" if a == "True" else "No", ["Yes", "No"]) for q, a in CB])
    write_task_folder(data, "super_glue_cb_write_a_claim", "validation",
                      [prompted(q, "a claim") for q, _ in CB])
    write_task_folder(data, "super_glue_copa_choose_score_eval", "validation",
                      score_eval("Rain. So?", ["wet", "dry"], 0, 0)
                      + score_eval("Sun. Because?", ["night", "day"], 1, 1))
    write_task_folder(data, "race_high_pick", "train", [prompted("Q", "A")])
    return os.path.dirname(data)


def test_prepare_writes_the_mixture_and_the_eval_tasks(tmp_path):
    out = str(tmp_path / "out")
    report = prepare_p3(_p3(tmp_path), out, workers=1, progress=False)
    with open(os.path.join(out, "mtf", "glue_mrpc.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    # prompts in name order (paraphrase, same_thing), P3's leading space stripped
    assert lines == [{"inputs": "Para? A / B", "targets": "yes"},
                     {"inputs": "Same? A / B", "targets": "yes"},
                     {"inputs": "Same? C / D", "targets": "no"}]
    assert report["mtf"]["imdb"]["examples"] == 1 and report["mtf"]["imdb"]["empty_skipped"] == 1
    assert report["incomplete"] == ["imdb_sentiment"]
    assert sorted(os.listdir(os.path.join(out, "mtf"))) == ["glue_mrpc.jsonl", "imdb.jsonl"]
    with open(os.path.join(out, "mtf_data.json"), encoding="utf-8") as f:
        assert json.load(f) == {"data": {
            "objective": "multitask", "mixture_cap": 500_000,
            # in table order
            "paths": [os.path.join(out, "tokenized", d) for d in ("imdb", "glue_mrpc")]}}
    assert any(c.startswith("megarch-data preprocess --input ") and "--json-keys inputs "
               "targets" in c for c in report["commands"])

    cb = load_task(os.path.join(out, "tasks", "cb.jsonl"))
    assert cb.n_prompts == 2 and [e.label for e in cb.examples] == [0, 1, 2]
    assert cb.examples[1].prompts == ["Cats bark. Cats are loud?",
                                      "Cats bark. Cats are loud? Always, sometimes or never?"]
    # the second prompt's correct choice moved to the shared label's index
    assert cb.examples[1].choices == [["True", "False", "Neither"],
                                      ["Always", "Never", "Sometimes"]]
    assert report["tasks"]["cb"]["prompts"] == ["GPT_3_style", "always_sometimes_never"]
    copa = load_task(os.path.join(out, "tasks", "copa.jsonl"))
    assert [(e.prompts, e.choices, e.label) for e in copa.examples] == [
        (["Rain. So?"], [["wet", "dry"]], 0), (["Sun. Because?"], [["night", "day"]], 1)]
    assert report["skipped_prompts"] == [
        "super_glue_cb_unlabelled: validation record 0: the target '<NO LABEL>' is not one of "
        "the answer choices ['True', 'False', 'Neither'] (a split without labels?)",
        "super_glue_cb_write_a_claim: no validation split with answer choices",
        "cb prompt is_it_true: 2 answer choices where the dataset's other prompts have 3"]
    missing = report["missing"]
    assert len(missing) == 36 + 9  # T0's other 36 training and 9 eval datasets
    assert "t0_eval: rte (no P3 folder matches super_glue_rte_*)" in missing
    assert "t0_train: glue_qqp (no P3 folder glue_qqp_* with a train split)" in missing


def test_eval_tasks_score_with_rank_classification(tmp_path):
    from megarch.data.tokenizers import load_tokenizer
    from megarch.eval.rank_classification import rank_classify
    from tests.eval.helpers import tiny

    out = str(tmp_path / "out")
    prepare_p3(_p3(tmp_path), out, mixture=None, progress=False)
    task = load_task(os.path.join(out, "tasks", "cb.jsonl"))
    scores = rank_classify(tiny("causal_decoder"), load_tokenizer("bytes"), task)
    assert [[len(choices) for choices in per_prompt] for per_prompt in scores.scores] == [
        [3, 3, 3], [3, 3, 3]]  # [prompt][example][choice]
    assert scores.labels == [0, 1, 2] and len(scores.prompt_accuracies()) == 2


def test_prompts_that_disagree_on_examples_are_refused(tmp_path):
    root = _p3(tmp_path)
    write_task_folder(os.path.join(root, "data"), "super_glue_cb_can_we_infer", "validation",
                      [prompted(q, a, ["True", "False", "Neither"]) for q, a in CB[:2]])
    with pytest.raises(DataError, match=r"eval dataset cb: its prompts have different numbers "
                       r"of examples .*'can_we_infer': 2"):
        prepare_p3(root, str(tmp_path / "out"), mixture=None, progress=False)


def test_a_short_download_is_caught_by_its_stats(tmp_path):
    root = _p3(tmp_path)
    write_task_folder(os.path.join(root, "data"), "glue_mrpc_same_thing", "train",
                      [prompted("Same? A / B", "yes")], stats_count=2)
    with pytest.raises(DataError, match=r"glue_mrpc_same_thing: 1 train records, but .* says "
                       r"2; the download is incomplete"):
        prepare_p3(root, str(tmp_path / "out"), eval_suite=None, progress=False)


def test_cli_prints_the_summary_and_reports_missing_input(tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["p3", "--p3-dir", _p3(tmp_path), "--out", out, "--workers", "2", "-q"]
    assert data_main(argv) == 0
    text = capsys.readouterr().out
    assert "mtf   glue_mrpc" in text and "eval  cb" in text and "not found (45):" in text
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["tasks"]["copa"]["examples"] == 2
    assert data_main(["p3", "--p3-dir", str(tmp_path / "nowhere"), "--out", out, "-q"]) == 2
    assert "nowhere: not a directory" in capsys.readouterr().err


def _empty_folder(data: str, name: str, split: str) -> None:
    """A P3 folder whose split holds no records (and says so in its stats)."""
    os.makedirs(os.path.join(data, name))
    write_tfrecord(os.path.join(data, name, f"{split}.tfrecord-00000-of-00001"), [])
    with open(os.path.join(data, name, f"stats.{split}.json"), "w", encoding="utf-8") as f:
        json.dump({"examples": 0}, f)


def test_datasets_and_prompts_without_examples_are_reported_not_written(tmp_path):
    root = str(tmp_path / "p3")
    data = os.path.join(root, "data")
    _empty_folder(data, "imdb_empty_prompt", "train")
    write_task_folder(data, "ag_news_blank", "train",
                      [{"inputs_pretokenized": ["x"], "targets_pretokenized": [" "]}])
    _empty_folder(data, "super_glue_cb_p1", "validation")
    write_task_folder(data, "super_glue_rte_p1", "validation",
                      [prompted("a", "yes", ["yes", "no"])])
    report = prepare_p3(root, str(tmp_path / "out"), progress=False)
    assert report["mtf"] == {}  # nothing to train on: no file, no config entry, no command
    assert not os.path.exists(tmp_path / "out" / "mtf" / "imdb.jsonl")
    missing = "\n".join(report["missing"])
    assert "t0_train: imdb (its train records hold no example with a target" in missing
    assert "t0_train: ag_news (its train records hold no example with a target; 1 empty" in missing
    (cb,) = [p for p in report["skipped_prompts"] if p.startswith("super_glue_cb_p1: ")]
    assert "None" not in cb and "validation" in cb, cb
    assert list(report["tasks"]) == ["rte"]
    assert not any("preprocess" in c for c in report.get("next_commands", []))
