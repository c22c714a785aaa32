import json

import pytest

from rlscratch import data


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "math500").mkdir()
    monkeypatch.setenv("RLSCRATCH_DATA", str(tmp_path))
    return tmp_path


def test_gsm8k_record(data_root):
    rows = [{"question": "Q1?", "answer": "a = <<1+1=2>>2\nb = <<2*3=6>>6\n#### 1,206"},
            {"question": "Q2?", "answer": "one step\n#### -3"}]
    (data_root / "gsm8k" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    problems = data.load_gsm8k("test")
    assert [p.answer for p in problems] == ["1206", "-3"]
    assert [p.level for p in problems] == [2, 1]
    assert problems[0].id == "gsm8k-test-0" and problems[0].dataset == "gsm8k"
    assert len(data.load_gsm8k("test", limit=1)) == 1


def test_malformed_jsonl_names_file_and_line(data_root):
    path = data_root / "gsm8k" / "train.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{not json\n")
    with pytest.raises(data.DataError, match=r"train.jsonl:2"):
        data.load_gsm8k("train")


def test_missing_field_is_reported(data_root):
    (data_root / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(data.DataError, match=r"test.jsonl:1"):
        data.load_gsm8k("test")


def test_gsm8k_without_final_answer(data_root):
    (data_root / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(data.DataError, match="record 1"):
        data.load_gsm8k("test")


def test_math500_record(data_root):
    rows = [{"problem": "P", "solution": "S \\boxed{\\frac12}", "answer": "\\frac12", "subject": "Algebra",
             "level": 3, "unique_id": "test/algebra/1.json"}]
    (data_root / "math500" / "test.json").write_text(json.dumps(rows))
    [p] = data.load_math500()
    assert (p.id, p.answer, p.level, p.subject, p.dataset) == ("test/algebra/1.json", "\\frac12", 3, "Algebra", "math")


def test_missing_dataset_says_where_it_looked(data_root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(data.DataError, match="looked in .*math500"):
        data.load_math500()


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        data.load_gsm8k("validation")


def test_shared_data_when_available():
    """The real files (CI points RLSCRATCH_DATA at them) load completely."""
    if data.data_dir() is None or not (data.data_dir() / "gsm8k" / "test.jsonl").exists():
        pytest.skip("RLSCRATCH_DATA is not set")
    assert len(data.load_gsm8k("test")) == 1319
    assert len(data.load_gsm8k("train")) == 7473
    math = data.load_math500()
    assert len(math) == 500 and {p.level for p in math} == {1, 2, 3, 4, 5}
