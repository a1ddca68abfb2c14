"""Hugging Face datasets as a source (`data.source: hf:PATH`): save_to_disk folders (Dataset and
DatasetDict), parquet / arrow / JSON files, column mapping, splits, streaming, and the one-line
errors. Training from a save_to_disk folder equals training from the same rows as JSONL, bit
for bit. All local: no network."""

import copy
import json
import sys

import pytest
import torch

from distill.config import build_config
from distill.data.build import build_rows
from distill.data.hf import hf_objects
from distill.data.rows import Row, builtin_rows, read_jsonl
from distill.errors import DistillError
from distill.training.loop import train

from helpers import read_metrics, student_weights

datasets = pytest.importorskip("datasets")

TIMING = {"tokens_per_s", "step_s", "teacher_s"}  # wall-clock fields: the rest must match exactly


@pytest.fixture(autouse=True)
def own_datasets_cache(tmp_path, monkeypatch):
    """datasets converts local files into its Arrow cache: keep it in the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def chain_dicts(n: int, split: str = "train") -> list[dict]:
    """Prompt / completion / answer rows of the built-in task, as plain dicts."""
    return [{"prompt": r.prompt, "completion": r.completion, "answer": r.answer} for r in builtin_rows(split, n, 0, 3, 6)]


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_config(tmp_path, **data):
    tree = {"student": {"config": {"model_type": "llama"}, "tokenizer": "builtin"}, "objective": {"alpha": 0.0}}
    return build_config(tree | {"data": data, "out_dir": str(tmp_path / "run")}).data


def test_training_from_save_to_disk_equals_training_from_jsonl(tiny_tree, tmp_path):
    rows = chain_dicts(48)
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    runs = {}
    for name, source in (("jsonl", str(jsonl)), ("hf", f"hf:{folder}")):
        tree = copy.deepcopy(tiny_tree)
        tree["data"] = {"source": source}
        tree["train"].update(steps=3, micro_batch_size=8)
        tree["out_dir"] = str(tmp_path / name)
        train(build_config(tree), show_progress=False)
        runs[name] = tmp_path / name
    ma, mb = read_metrics(runs["jsonl"]), read_metrics(runs["hf"])
    assert len(ma) == 3
    assert [{k: v for k, v in m.items() if k not in TIMING} for m in ma] == [
        {k: v for k, v in m.items() if k not in TIMING} for m in mb
    ]
    wa, wb = student_weights(runs["jsonl"]), student_weights(runs["hf"])
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_files_and_folders_read_the_same_rows_as_jsonl(tmp_path):
    rows = chain_dicts(20) + [{"text": "a plain text row"}]  # a text row among prompt rows: nulls elsewhere
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    expected = read_jsonl(jsonl)
    ds = datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in ("prompt", "completion", "answer", "text")})
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    (tmp_path / "files").mkdir()
    ds.to_parquet(str(tmp_path / "files" / "train.parquet"))
    for source in (f"hf:{jsonl}", f"hf:{tmp_path / 'rows.parquet'}", str(tmp_path / "rows.parquet"), f"hf:{arrow}",
                   f"hf:{tmp_path / 'saved'}", f"hf:{tmp_path / 'files'}"):  # fmt: skip
        assert build_rows(data_config(tmp_path, source=source), "train") == expected, source


def test_a_dataset_dict_gives_the_split_asked_for(tmp_path):
    train_rows, test_rows = chain_dicts(12), chain_dicts(5, "test")
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(train_rows), "test": datasets.Dataset.from_list(test_rows)})
    splits.save_to_disk(str(tmp_path / "dd"))
    source = f"hf:{tmp_path / 'dd'}"
    dcfg = data_config(tmp_path, source=source, eval_source=source, n_test=3)
    assert build_rows(dcfg, "train") == [Row(r["prompt"], r["completion"], r["answer"]) for r in train_rows]
    assert build_rows(dcfg, "test") == [Row(r["prompt"], r["completion"], r["answer"]) for r in test_rows[:3]]
    swapped = data_config(tmp_path, source=source, split="test")
    assert [r.prompt for r in build_rows(swapped, "train")] == [r["prompt"] for r in test_rows]


def test_columns_map_fields_and_a_mapped_column_is_not_read_twice(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"work {i} #### {i}", "final": i} for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "qa"))
    source = f"hf:{tmp_path / 'qa'}"
    mapped = build_rows(data_config(tmp_path, source=source, columns={"prompt": "question", "completion": "answer"}), "train")
    assert mapped[2] == Row("q2", "work 2 #### 2", None)  # 'answer' is the completion's column, not the gold answer
    graded = data_config(tmp_path, source=source, columns={"prompt": "question", "completion": "answer", "answer": "final"})
    assert build_rows(graded, "train")[2] == Row("q2", "work 2 #### 2", "2")


def test_streaming_reads_the_first_n_train_rows_in_order(tmp_path):
    rows = chain_dicts(40)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "big.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    first = [Row(r["prompt"], r["completion"], r["answer"]) for r in rows[:7]]
    for source in (f"hf:{tmp_path / 'big.parquet'}", f"hf:{tmp_path / 'saved'}"):
        assert build_rows(data_config(tmp_path, source=source, streaming=True, n_train=7), "train") == first
    whole = build_rows(data_config(tmp_path, source=f"hf:{tmp_path / 'big.parquet'}", n_train=7), "train")
    assert len(whole) == 40  # without streaming, every row (as from a JSONL file)


def test_streaming_leaves_the_file_as_it_is_and_stops_at_n(tmp_path):
    """Streaming reads the file itself: no Arrow copy in datasets' cache, as a load writes."""
    path = write_jsonl(tmp_path / "rows.jsonl", chain_dicts(30))
    cache = tmp_path / "hf-cache"
    objects = list(hf_objects(f"hf:{path}", streaming=True, n=3))
    assert [where for where, _ in objects] == [f"hf:{path} row {i}" for i in (1, 2, 3)]
    assert not list(cache.rglob("*.arrow"))
    assert len(list(hf_objects(f"hf:{path}"))) == 30
    assert list(cache.rglob("*.arrow"))


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"columns": {"prompt": "query"}}, r"hf:.*saved: no column 'query' \(data.columns prompt\); its columns: prompt, completion, answer"),
        ({"split": "test"}, r"saved: a single dataset with no split named 'test'; leave data.split unset"),
        ({}, r"saved row 5: empty completion$"),
    ],
)
def test_bad_columns_and_splits_are_one_line_errors(tmp_path, data, pattern):
    datasets.Dataset.from_list(chain_dicts(4) + [{"prompt": "p", "completion": "", "answer": "1"}]).save_to_disk(
        str(tmp_path / "saved")
    )
    dcfg = data_config(tmp_path, source=f"hf:{tmp_path / 'saved'}", **data)
    with pytest.raises(DistillError, match=pattern) as info:
        build_rows(dcfg, "train")
    assert "\n" not in str(info.value)


def test_a_missing_split_names_the_splits_there(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chain_dicts(3))}).save_to_disk(str(tmp_path / "dd"))
    dcfg = data_config(tmp_path, source=f"hf:{tmp_path / 'dd'}", split="validation")
    with pytest.raises(DistillError, match=r"dd: no split 'validation' \(data.split\); its splits: train$"):
        build_rows(dcfg, "train")


def test_a_dataset_without_a_completion_column_says_how_to_map_one(tmp_path):
    datasets.Dataset.from_list([{"question": "q", "solution": "s"}]).to_parquet(str(tmp_path / "qa.parquet"))
    with pytest.raises(DistillError, match=r"no 'completion' or 'text' column \(its columns: question, solution\); map one"):
        build_rows(data_config(tmp_path, source=str(tmp_path / "qa.parquet")), "train")


def test_unreadable_and_missing_files_are_one_line_errors(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(DistillError, match=r"bad.parquet: cannot read it with datasets \(\w+: ") as info:
        build_rows(data_config(tmp_path, source=str(tmp_path / "bad.parquet")), "train")
    assert "\n" not in str(info.value)
    with pytest.raises(DistillError, match=r"hf:\./nowhere: no such file or folder"):
        build_rows(data_config(tmp_path, source="hf:./nowhere"), "train")
    (tmp_path / "rows.txt").write_text("text\n")
    with pytest.raises(DistillError, match=r"rows.txt: unknown data file type '.txt'"):
        build_rows(data_config(tmp_path, source=f"hf:{tmp_path / 'rows.txt'}"), "train")


def test_without_datasets_installed_the_error_names_the_package(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "rows.jsonl", chain_dicts(2))
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DistillError, match=r"the 'datasets' package, which is not installed: pip install datasets"):
        build_rows(data_config(tmp_path, source=f"hf:{tmp_path / 'rows.jsonl'}"), "train")


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"source": "builtin:chain", "columns": {"prompt": "q"}}, r"data.columns apply to Hugging Face sources"),
        ({"source": "rows.jsonl", "streaming": True}, r"data.streaming apply to Hugging Face sources.*'hf:rows.jsonl'"),
        ({"source": "hf:x/y", "columns": {"question": "q"}}, r"'question' is not a row field"),
        ({"source": "hf:x/y", "eval_source": "hf:./missing"}, r"not found: 'hf:./missing'"),
    ],
)
def test_config_errors_of_hf_keys(tmp_path, data, pattern):
    with pytest.raises(DistillError, match=pattern):
        data_config(tmp_path, **data)


def test_generate_reads_prompts_from_a_dataset(tmp_path):
    from distill.pipeline.generate import Prompt, read_prompts

    rows = [{"question": f"what is {i}+1?", "final": i + 1} for i in range(5)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "q.parquet"))
    source = f"hf:{tmp_path / 'q.parquet'}"
    got = read_prompts(source, 2, columns={"prompt": "question", "answer": "final"})
    assert got == [Prompt(0, "what is 0+1?", "1"), Prompt(1, "what is 1+1?", "2")]
    with pytest.raises(DistillError, match=r"no 'prompt' column \(its columns: question, final\); map one with --columns"):
        read_prompts(source, None)


def test_pruning_calibration_reads_the_first_rows_of_a_dataset(tmp_path):
    from distill.models.calibration import calibration_texts

    rows = chain_dicts(10)
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    assert calibration_texts(str(tmp_path / "rows.parquet"), 4) == calibration_texts(jsonl, 4)
    assert len(calibration_texts(f"hf:{jsonl}", 4)) == 4
