"""The data stage (scripts/prepare_data.py): every input kind and format, the counts in the report, the split,
and a clear StageError (that touches no earlier output) for every bad input. In-process, on the demo
tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import dataset_source
import prepare_data
import pytest
from common import StageError, parse_args, read_jsonl
from conftest import write_input

QA = [(f"What helps with symptom {i}?", f"Rest and fluids help with symptom {i}.") for i in range(12)]
PC_ROWS = [{"prompt": q, "completion": a} for q, a in QA]
BOS = "<|begin_of_text|>"


def chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def model_json(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("record") / "model.json"
    path.write_text(json.dumps({"path": str(tiny_model)}))
    return path


class Run:
    """One in-process run of the stage; outputs in `out`."""

    FILES = {"train": "train.jsonl", "eval": "eval.jsonl", "report": "report.json"}

    def __init__(self, model_json: Path, out: Path):
        self.model_json, self.out = model_json, out

    def config(self, data, **options) -> prepare_data.Config:
        out = {f"{name}_out": str(self.out / file) for name, file in self.FILES.items()}
        options = {"max_seq_length": 256, **options}
        return prepare_data.Config(path=str(data), model_json=str(self.model_json), **out, **options)

    def __call__(self, data, **options) -> dict:
        report = prepare_data.main(self.config(data, **options))
        assert report == json.loads((self.out / "report.json").read_text())
        self.train, self.eval = read_jsonl(self.out / "train.jsonl"), read_jsonl(self.out / "eval.jsonl")
        return report

    def rows(self) -> list[dict]:
        return self.train + self.eval

    def fails(self, data, *fragments: str, **options) -> str:
        """The run raises a StageError containing every fragment, and writes nothing."""
        with pytest.raises(StageError) as info:
            prepare_data.main(self.config(data, **options))
        message = str(info.value)
        for fragment in fragments:
            assert fragment in message, message
        assert not any(self.out.glob("*")), "a failing run must not write outputs"
        return message


@pytest.fixture
def run(model_json, tmp_path) -> Run:
    return Run(model_json, tmp_path / "out")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- input kinds --------------------------------------------------------------------------------------------


KINDS = [
    "json_array",
    "json_lines",
    "jsonl",
    "csv",
    "parquet",
    "arrow_file",
    "arrow_stream",
    "dataset",
    "dataset_dict",
]


@pytest.mark.parametrize("kind", KINDS)
def test_every_input_kind(run, tmp_path, kind):
    data = write_input(kind, tmp_path, PC_ROWS)
    report = run(data, split="test", eval_fraction=0.25)
    assert report["input_rows"] == 12 and report["kept"] == 12 and report["format"] == "prompt_completion"
    assert (report["train_rows"], report["eval_rows"]) == (9, 3)
    assert sorted(run.rows(), key=str) == sorted(PC_ROWS, key=str)


def test_arrow_file_written_by_datasets(run, tmp_path):
    data = write_input("dataset", tmp_path, PC_ROWS)
    run(next(data.glob("*.arrow")), eval_fraction=0)
    assert run.train == run.rows() and len(run.train) == 12


# --- formats ------------------------------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "Be brief."}
FORMAT_CASES = {
    "messages": (
        {"messages": [SYSTEM, *chat("Q?", "A.")], "source": "x"},
        {"messages": [SYSTEM, *chat("Q?", "A.")]},
    ),
    "sharegpt": (
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Q?"},
                           {"from": "gpt", "value": "A."}]},
        {"messages": [SYSTEM, *chat("Q?", "A.")]},
    ),
    "alpaca_with_input": (
        {"instruction": "Summarise.", "input": "Long text.", "output": "Short.", "system": "Be brief."},
        {"messages": [SYSTEM, *chat("Summarise.\n\nLong text.", "Short.")]},
    ),
    "alpaca_without_input": (
        {"instruction": "Summarise.", "input": "", "output": "Short."},
        {"messages": chat("Summarise.", "Short.")},
    ),
    "prompt_completion": ({"prompt": "Q?", "completion": " A.", "id": 3},
                          {"prompt": "Q?", "completion": " A."}),
    "text_custom_field": ({"body": "Some text.", "title": "t"}, {"text": "Some text."}),
    "seed_prompt": ({"prompt": f"{BOS}<|start_header_id|>user<|end_header_id|>\n\nQ?"}, {"text": (
        "<|start_header_id|>user<|end_header_id|>\n\nQ?")}),
}  # fmt: skip
RESOLVED = {"sharegpt": "messages", "alpaca_with_input": "alpaca", "alpaca_without_input": "alpaca"}


@pytest.mark.parametrize("case", FORMAT_CASES)
@pytest.mark.parametrize("fmt", ["auto", "explicit"])
def test_formats(run, tmp_path, case, fmt):
    row, expected = FORMAT_CASES[case]
    resolved = RESOLVED.get(case, case.split("_custom")[0].replace("seed_prompt", "text"))
    text_field = {"text_custom_field": "body", "seed_prompt": "prompt"}.get(case, "text")
    options = {"text_field": text_field} if fmt == "explicit" or case == "text_custom_field" else {}
    report = run(
        write_jsonl(tmp_path / "d.jsonl", [row]), format=resolved if fmt == "explicit" else "auto", **options
    )
    assert run.train == [expected] and run.eval == []
    assert report["format"] == resolved
    assert report["text_field"] == (text_field if resolved == "text" else None)


def test_seed_format_strips_bos_and_counts_it(run, tmp_path):
    rows = [{"prompt": f"{BOS}text {i}<|eot_id|>"} for i in range(3)] + [{"prompt": "no bos here"}]
    report = run(write_jsonl(tmp_path / "seed.jsonl", rows), eval_fraction=0)
    assert report["bos_stripped"] == 3 and report["format"] == "text"
    assert sorted(r["text"] for r in run.train) == ["no bos here"] + [f"text {i}<|eot_id|>" for i in range(3)]
    assert all(set(r) == {"text"} for r in run.train)  # no column named prompt reaches TRL


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["text", "conversations", "prompt", "completion"], ("messages", "text")),
        (["prompt", "completion", "instruction", "output", "text"], ("prompt_completion", "text")),
        (["instruction", "output", "text"], ("alpaca", "text")),
        (["text", "prompt"], ("text", "text")),
        (["prompt", "id"], ("text", "prompt")),
    ],
)
def test_auto_detection_order(columns, expected):
    assert dataset_source.resolve_format(columns, "auto", "text", "p") == expected


# --- split, sampling, determinism ---------------------------------------------------------------------------


def test_max_samples_and_eval_fraction(run, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", PC_ROWS)
    report = run(data, max_samples=10, eval_fraction=0.2)
    assert (report["kept"], report["train_rows"], report["eval_rows"]) == (12, 8, 2)
    assert not {json.dumps(r) for r in run.train} & {json.dumps(r) for r in run.eval}
    report = run(data, eval_fraction=0)
    assert (report["train_rows"], report["eval_rows"]) == (12, 0)
    assert (run.out / "eval.jsonl").read_text() == ""
    report = run(write_jsonl(tmp_path / "three.jsonl", PC_ROWS[:3]), eval_fraction=0.05)
    assert (report["train_rows"], report["eval_rows"]) == (2, 1)  # at least one eval row
    report = run(write_jsonl(tmp_path / "one.jsonl", PC_ROWS[:1]), eval_fraction=0.5)
    assert (report["train_rows"], report["eval_rows"]) == (1, 0)


def test_outputs_are_deterministic(model_json, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", PC_ROWS)
    outputs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        Run(model_json, tmp_path / name)(data, seed=seed, eval_fraction=0.25)
        outputs.append(
            [(tmp_path / name / f).read_bytes() for f in ("train.jsonl", "eval.jsonl", "report.json")]
        )
    assert outputs[0] == outputs[1]
    assert outputs[0][:2] != outputs[2][:2]  # another seed, another shuffle


def test_cli_arguments_of_the_rule():
    argv = (
        "--path P --format auto --text-field text --split train --config-name null --max-samples null "
        "--eval-fraction 0.1 --long-rows drop --max-dropped-fraction 0.5 --seed 42 --max-seq-length 256 "
        "--model-json m.json --train-out t.jsonl --eval-out e.jsonl --report-out r.json"
    ).split()
    cfg = parse_args(prepare_data.Config, argv)
    assert cfg.config_name is None and cfg.max_samples is None
    assert (cfg.eval_fraction, cfg.seed, cfg.max_seq_length) == (0.1, 42, 256)
    assert parse_args(prepare_data.Config, argv + ["--max-samples", "5"]).max_samples == 5


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


# --- held-out splits the dataset already has ----------------------------------------------------------------

HELD = [{"prompt": f"Held-out question {i}?", "completion": f"Held-out answer {i}."} for i in range(5)]


def dataset_dict(path: Path, **splits: list[dict]) -> Path:
    import datasets

    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(
        str(path))
    return path


def test_a_validation_split_is_the_held_out_set(run, tmp_path):
    """The dataset's own validation split is held out whole (eval_fraction does not apply); a held-out row that
    repeats a training row is dropped, so nothing held out was trained on."""
    data = dataset_dict(tmp_path / "dd", train=PC_ROWS, validation=HELD + [PC_ROWS[0]], test=HELD[:1])
    report = run(data, eval_fraction=0.25)
    assert (report["train_rows"], report["eval_rows"]) == (12, 5)
    assert sorted(run.eval, key=str) == sorted(HELD, key=str)
    assert sorted(run.train, key=str) == sorted(PC_ROWS, key=str)
    assert report["split"] == "train" and report["splits"] == ["train", "validation", "test"]
    assert report["eval_source"] == {"kind": "split", "split": "validation", "input_rows": 6, "kept": 5,
                                     "dropped": {"empty": 0, "duplicate": 0, "too_long": 0, "in_train": 1}}
    report = run(data, eval_split="test")
    assert report["eval_rows"] == 1 and run.eval == HELD[:1]
    report = run(data, eval_split="validation", max_eval_samples=2)
    assert report["eval_rows"] == 2 and report["train_rows"] == 12


def test_without_a_held_out_split_eval_fraction_applies(run, tmp_path):
    data = dataset_dict(tmp_path / "dd", train=PC_ROWS, validation=HELD)
    report = run(data, eval_split="none", eval_fraction=0.25)
    assert (report["train_rows"], report["eval_rows"]) == (9, 3)
    assert report["eval_source"] == {"kind": "fraction", "eval_fraction": 0.25}
    report = run(dataset_dict(tmp_path / "only_train", train=PC_ROWS), eval_fraction=0.25)
    assert (report["train_rows"], report["eval_rows"]) == (9, 3) and report["eval_source"]["kind"] == "fraction"


def test_a_dataset_repository_directory_uses_its_validation_file(run, tmp_path):
    """A directory laid out like a hub dataset repository (data files named by split), read through
    datasets.load_dataset as a hub dataset is."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    write_jsonl(repo / "data" / "train.jsonl", PC_ROWS)
    write_jsonl(repo / "data" / "validation.jsonl", HELD)
    report = run(repo)
    assert (report["train_rows"], report["eval_rows"]) == (12, 5)
    assert report["eval_source"]["split"] == "validation" and sorted(report["splits"]) == ["train", "validation"]


@pytest.mark.parametrize(
    ("layout", "options", "fragments"),
    [
        ("dict", {"eval_split": "dev"}, ("no split 'dev' (it has train, validation)", "dataset.eval_split")),
        ("dict", {"eval_split": "train"}, ("dataset.eval_split 'train' is the training split",)),
        ("file", {"eval_split": "validation"}, ("is a single file without splits", "auto or none")),
        ("dict_bad_row", {}, ("split validation row 2: messages[0].role 'robot' is not one of", "(format messages)")),
        ("dict_all_in_train", {}, ("split validation: 2 of 2 rows dropped (2 in_train), no rows left",
                                   "set dataset.eval_split none")),
    ],
)
def test_bad_held_out_splits(run, tmp_path, layout, options, fragments):
    if layout == "file":
        data = write_jsonl(tmp_path / "d.jsonl", PC_ROWS)
    elif layout == "dict_bad_row":
        good, bad = {"messages": chat("Q?", "A.")}, {"messages": [{"role": "robot", "content": "Q?"}]}
        data = dataset_dict(tmp_path / "dd", train=[{"messages": chat(q, a)} for q, a in QA], validation=[good, bad])
    elif layout == "dict_all_in_train":
        data = dataset_dict(tmp_path / "dd", train=PC_ROWS, validation=PC_ROWS[:2])
    else:
        data = dataset_dict(tmp_path / "dd", train=PC_ROWS, validation=HELD)
    run.fails(data, *fragments, **options)
