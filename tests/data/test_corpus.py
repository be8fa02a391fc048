"""Reading documents: the bundled corpus and user files, directories, globs and JSON lines."""

import json
import os

import pytest

from research.data import DataConfig, clean_documents, default_corpus_documents, read_documents
from research.errors import UserError


def test_default_corpus_is_hundreds_of_scenes_and_cleans():
    documents = default_corpus_documents()
    assert len(documents) > 700
    assert documents[0].startswith("# A Midsummer Night's Dream\n\n## ACT I\n\n### SCENE I.")
    assert all(doc.startswith("# ") for doc in documents)
    assert sum(map(len, documents)) > 4_000_000
    cleaned, report = clean_documents(documents, min_chars=64, scrubber=DataConfig().scrubber())
    assert report.documents_out == len(cleaned) > 700
    assert report.scrubbed == {}  # The default scrubbing replaces nothing in Shakespeare.
    assert cleaned[0].startswith("A Midsummer Night's Dream\n\nACT I\n\nSCENE I.")
    assert "**" not in cleaned[0] and "\nTHESEUS\nNow, fair Hippolyta" in cleaned[0]


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub" / "b.md").write_text("# beta")
    (tmp_path / "sub" / "deeper" / "c.txt").write_text("gamma")
    (tmp_path / "ignored.csv").write_text("x,y")
    lines = [{"text": "one", "id": 1}, {"text": "two"}, {"text": "three"}]
    (tmp_path / "sub" / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return tmp_path


def test_directory_is_read_recursively_in_walk_order(tree):
    assert read_documents([str(tree)]) == ["alpha text", "# beta", "one", "two", "three", "gamma"]


def test_glob_and_file_list(tree):
    assert read_documents([str(tree / "**" / "*.txt")]) == ["alpha text", "gamma"]
    files = [str(tree / "sub" / "b.md"), str(tree / "a.txt")]
    assert read_documents(files) == ["# beta", "alpha text"]


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"body": "first"}\n{"body": "second", "text": "ignored"}\n')
    assert read_documents([str(path)], text_field="body") == ["first", "second"]


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d: str(d / "missing.txt"), "does not exist"),
        (lambda d: str(d / "*.nothing"), "matches no file"),
        (lambda d: str(d / "empty_dir"), "no *.txt"),
        (lambda d: str(d / "table.csv"), "extension is not supported"),
        (lambda d: str(d / "no_field.jsonl"), "no_field.jsonl:2 has no field 'text'"),
        (lambda d: str(d / "bad.jsonl"), "bad.jsonl:1 is not valid JSON"),
        (lambda d: str(d / "number.jsonl"), "number.jsonl:1 field 'text' is a int"),
    ],
)
def test_source_errors_are_user_errors(tmp_path, make, fragment):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "table.csv").write_text("a,b")
    (tmp_path / "no_field.jsonl").write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "number.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(UserError, match="data.sources|data.text_field") as error:
        read_documents([make(tmp_path)])
    assert fragment in str(error.value)
    assert os.linesep not in str(error.value).strip()  # One paragraph.
