"""Through the real `distill train`: a Hugging Face source with a missing column, a missing split
or an unreadable file, and a tracker whose package is not installed, are each one `error:` line
naming it, exit 1, before the run folder exists."""

import importlib.util

import pytest
from fault_helpers import one_line

datasets = pytest.importorskip("datasets")


@pytest.fixture
def saved(tmp_path, monkeypatch):
    """A DatasetDict (train, test) of question / solution rows, saved with save_to_disk."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    rows = [{"question": f"Q:{i}+1=", "solution": f"{i + 1}#{i + 1}"} for i in range(8)]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])})
    splits.save_to_disk(str(tmp_path / "qa"))
    return f"hf:{tmp_path / 'qa'}"


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"columns": {"prompt": "question", "completion": "answer"}}, r"qa: no column 'answer' \(data.columns completion\); its columns: question, solution$"),
        ({"columns": {"prompt": "question", "completion": "solution"}, "split": "validation"}, r"qa: no split 'validation' \(data.split\); its splits: train, test$"),
        ({}, r"qa: no 'completion' or 'text' column \(its columns: question, solution\); map one with data.columns"),
    ],
)  # fmt: skip
def test_a_bad_hf_source_is_one_line_before_the_run_folder(cli, tree, write_yaml, tmp_path, saved, data, pattern):
    tree["data"] = {"source": saved, **data}
    one_line(cli("train", write_yaml(tree)), 1, pattern)
    assert not (tmp_path / "run").exists()


def test_an_unreadable_parquet_file_is_one_line(cli, tree, write_yaml, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    (tmp_path / "rows.parquet").write_bytes(b"PAR1" + b"\x00" * 64)
    tree["data"] = {"source": str(tmp_path / "rows.parquet")}
    one_line(cli("train", write_yaml(tree)), 1, r"rows.parquet: cannot read it with datasets \(\w+: .+\)$")
    assert not (tmp_path / "run").exists()


def test_a_missing_tracker_package_is_one_line(cli, tree, write_yaml, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    tree["train"]["report_to"] = ["mlflow"]
    one_line(cli("train", write_yaml(tree)), 1, r"^error: train.report_to: 'mlflow' needs the 'mlflow' package, which is not installed")
    assert not (tmp_path / "run").exists()
