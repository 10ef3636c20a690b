"""Bad training data gives one ValueError naming the file (and line) and what to do, not a traceback."""

from __future__ import annotations

import json

import pytest
from test_training_helpers import make_text_dir

from hf_attnres.training.data import load_documents, split_documents


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(76)) + '{"text": broken\n')
    with pytest.raises(ValueError, match=rf"^{f}:77: not valid JSON .*fix or remove that line"):
        load_documents([str(f)])


def test_jsonl_line_that_is_not_an_object(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "a"}\n["b"]\n')
    with pytest.raises(ValueError, match=rf"^{f}:2: not a JSON object"):
        load_documents([str(f)])


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.txt", "blank.md"])
def test_empty_file_says_it_is_empty(tmp_path, name):
    f = tmp_path / name
    f.write_text("" if name.startswith("empty") else "\n  \n")
    with pytest.raises(ValueError, match=rf"^{f} is empty: add text"):
        load_documents([str(f)])


def test_folder_without_documents(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=rf"^{tmp_path} holds no documents"):
        load_documents([str(tmp_path)])


def test_single_document_cannot_be_split(tmp_path):
    docs = load_documents([str(make_text_dir(tmp_path / "d", n_docs=1, chars=300))])
    with pytest.raises(ValueError, match="holds 1 document.*one document each.*--validation-fraction 0"):
        split_documents(docs, 0.1, seed=0)
