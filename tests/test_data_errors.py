"""The data stage's report counts (what was dropped and why) and a clear StageError, touching no earlier output,
for every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import prepare_data
import pytest
from hpc_finetune.io.cli import StageError
from hpc_finetune.io.files import read_jsonl
from support.common import write_input
from support.data import PC_ROWS, QA, Run, chat, write_jsonl

# --- validation counts --------------------------------------------------------------------------------------

LONG = {"instruction": "Explain.", "output": "word " * 400}
COUNTED = [{"instruction": q, "output": a} for q, a in QA[:6]] + [
    {"instruction": "   ", "output": "An answer without a question."},  # empty
    {"instruction": "A question without an answer?", "output": None},  # empty
    {"instruction": QA[0][0], "input": "", "output": QA[0][1]},  # duplicate after normalisation
    {"instruction": QA[1][0], "output": QA[1][1]},  # duplicate
    LONG,
]


def test_report_counts_under_drop(run, tmp_path):
    report = run(write_jsonl(tmp_path / "d.jsonl", COUNTED), eval_fraction=0)
    assert report["input_rows"] == 11 and report["kept"] == 6
    assert report["dropped"] == {"empty": 2, "duplicate": 2, "too_long": 1} and report["truncated"] == 0
    assert len(run.train) == 6 and all(r["messages"][-1]["content"] != LONG["output"] for r in run.train)
    tokens = report["tokens"]
    assert 0 < tokens["min"] <= tokens["mean"] <= tokens["p95"] <= tokens["max"] <= 256


def test_report_counts_under_truncate(run, tmp_path):
    report = run(write_jsonl(tmp_path / "d.jsonl", COUNTED), eval_fraction=0, long_rows="truncate")
    assert report["kept"] == 7 and report["truncated"] == 1
    assert report["dropped"] == {"empty": 2, "duplicate": 2, "too_long": 0}
    assert report["tokens"]["max"] > 256 and len(run.train) == 7


def test_long_rows_error_names_the_rows(run, tmp_path):
    rows = [*COUNTED, LONG | {"input": "again"}]
    run.fails(
        write_jsonl(tmp_path / "d.jsonl", rows), "2 rows longer than max_seq_length=256",
        "row 11 (", "row 12 (", "long_rows", long_rows="error",
    )  # fmt: skip
    run.fails(write_jsonl(tmp_path / "one.jsonl", COUNTED), "1 row longer than max_seq_length=256", long_rows="error")


def test_counts_agree_with_their_nouns():
    """One helper puts every count before its noun (no "1 rows", no "1 bytes")."""
    from hpc_finetune.io.cli import plural

    assert [plural(n, "row") for n in (0, 1, 2)] == ["0 rows", "1 row", "2 rows"]
    assert plural(1, "logged train loss") == "1 logged train loss" and plural(3, "process") == "3 processes"
    assert plural(2, "index", "indices") == "2 indices"


def test_messages_without_assistant_content_are_empty(run, tmp_path):
    rows = [{"messages": chat(q, a)} for q, a in QA[:4]]
    rows += [
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": chat("Q", " ")},
        {"messages": []},
    ]
    report = run(write_jsonl(tmp_path / "d.jsonl", rows), eval_fraction=0, max_dropped_fraction=0.5)
    assert report["dropped"]["empty"] == 3 and report["kept"] == 4


# --- bad input ----------------------------------------------------------------------------------------------


def test_malformed_jsonl_names_file_and_line(run, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": broken}\n')
    run.fails(path, str(path), "line 3")


def test_malformed_json_names_file_and_line(run, tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    run.fails(path, str(path), "line 3", "not valid JSON")
    path.write_text('[{"text": "a"}, "not an object"]')
    run.fails(path, str(path), "item 2", "expected a JSON object")


def test_malformed_csv_names_file_and_line(run, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,source\n"a",x\n"b",y,extra\n')
    run.fails(path, str(path), "line 3", "3 fields")


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"messages": [{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}]},
         "row 3: messages[1].role 'bot' is not one of system, user, assistant"),
        ({"conversations": [{"from": "robot", "value": "Q"}]},
         "row 3: conversations[0].from 'robot' is not one of system, human, gpt"),
        ({"messages": [{"role": "user", "content": 5}]},
         "row 3: messages[0].content is int, expected a string"),
        ({"messages": "Q and A"}, "row 3: messages is str, expected a list"),
    ],
)  # fmt: skip
def test_bad_row_names_row_and_problem(run, tmp_path, row, problem):
    rows = [{"messages": chat(q, a)} for q, a in QA[:2]] + [row]
    run.fails(write_jsonl(tmp_path / "d.jsonl", rows), str(tmp_path / "d.jsonl"), problem)


def test_missing_columns_lists_the_columns(run, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": q, "answer": a} for q, a in QA])
    run.fails(data, "cannot detect the format", "columns are question, answer", "instruction and output")
    run.fails(
        data, "format alpaca needs the column(s) instruction and output", "question, answer", format="alpaca"
    )
    run.fails(data, "'body' (dataset.text_field)", format="text", text_field="body")


def test_unknown_hub_dataset_offline(run):
    message = run.fails(
        "nosuchorg/nosuchdataset", "'nosuchorg/nosuchdataset'", "set dataset.path to a local file"
    )
    assert "pre-download" in message and "save_to_disk" in message


@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        ("missing.jsonl", ("missing.jsonl not found",)),
        ("notes.txt", ("unsupported file type '.txt'",)),
        ("plain_dir", ("neither saved with datasets' save_to_disk nor holding data files",)),
        ("dataset_dict", ("no split 'validation' (it has train, test)", "dataset.split")),
        ("empty.jsonl", ("has no rows",)),
    ],
)
def test_bad_paths(run, tmp_path, name, fragments):
    path = tmp_path / name
    if name == "notes.txt":
        path.write_text("hello\n")
    elif name == "plain_dir":
        path.mkdir()
    elif name == "dataset_dict":
        path = write_input("dataset_dict", tmp_path, PC_ROWS)
    elif name == "empty.jsonl":
        path.write_text("\n")
    run.fails(path, *fragments, split="validation")


def test_too_many_dropped(run, tmp_path):
    rows = [{"text": "kept one"}, {"text": ""}, {"text": None}, {"text": "  "}]
    run.fails(write_jsonl(tmp_path / "d.jsonl", rows), "3 of 4 rows dropped", "3 empty", "dataset.text_field")
    long = [{"text": "word " * 300}] * 2
    run.fails(
        write_jsonl(tmp_path / "l.jsonl", long), "no rows left", "1 too_long", "1 duplicate",
        "raise training.max_seq_length", max_dropped_fraction=1.0,
    )  # fmt: skip


def test_bad_settings(run, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", PC_ROWS)
    run.fails(data, "format must be one of", "long_rows must be one of", format="xml", long_rows="cut")
    run.fails(data, "eval_fraction must be in [0, 1)", eval_fraction=1.0)


def test_tokenizer_without_chat_template(tiny_model, tmp_path):
    model = shutil.copytree(tiny_model, tmp_path / "model")
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "model.json").write_text(json.dumps({"path": str(model)}))
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": chat(q, a)} for q, a in QA])
    Run(tmp_path / "model.json", tmp_path / "out").fails(data, "has no chat template")


def test_failing_run_leaves_earlier_outputs_untouched(run, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", PC_ROWS)
    run(good)
    before = {p.name: p.read_bytes() for p in run.out.iterdir()}
    bad = write_jsonl(tmp_path / "bad.jsonl", PC_ROWS + [{"prompt": "Q", "completion": ["not", "text"]}])
    with pytest.raises(StageError, match="row 13: completion is list"):
        prepare_data.main(run.config(bad))
    assert {p.name: p.read_bytes() for p in run.out.iterdir()} == before


def test_cli_exit_status_and_message(repo, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "q"}])
    args = [
        sys.executable,
        str(repo / "scripts" / "prepare_data.py"),
        "--path",
        str(data),
        "--model-json",
        "m",
    ]
    args += ["--train-out", "t", "--eval-out", "e", "--report-out", "r"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert (
        proc.returncode == 2 and "cannot detect the format" in proc.stderr and "Traceback" not in proc.stderr
    )


def test_token_lengths_count_what_the_trainer_sees(run, tmp_path, tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [f"Rest and fluids help with symptom {i}." * (i + 1) for i in range(4)]
    lengths = [len(tokenizer(t + tokenizer.eos_token)["input_ids"]) for t in texts]  # BOS + text + EOS
    report = run(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts]), eval_fraction=0)
    assert (report["tokens"]["min"], report["tokens"]["max"]) == (min(lengths), max(lengths))
    report = run(tmp_path / "d.jsonl", eval_fraction=0, max_seq_length=sorted(lengths)[2])
    assert report["dropped"]["too_long"] == 1 and report["tokens"]["max"] == sorted(lengths)[2]


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(StageError, match=r"bad.jsonl line 2: not valid UTF-8"):
        read_jsonl(path)
