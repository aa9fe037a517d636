"""Evaluation prompt sets: the built-in compositional set, the file loaders and their errors."""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from apexdistill.eval.prompts import (
    BUILTIN_SETS,
    COMPOSITIONAL_TAGS,
    PromptSet,
    _PLURALS,
    load_prompt_set,
    prompt_set_from_list,
)


@pytest.fixture
def mem_root():
    """A fresh folder on fsspec's process-wide memory filesystem, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/prompts-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _write_parquet(path, **columns):
    pq.write_table(pa.table(columns), str(path))


# ----------------------------------------------------------------------------- built-in set


def test_builtin_set_shape():
    s = load_prompt_set("builtin:compositional")
    assert s is load_prompt_set("compositional")
    assert s.source == "builtin:compositional"
    assert 180 <= len(s) <= 220
    assert len(set(s.prompts)) == len(s.prompts)
    assert all(len(t) == 1 and t[0] in COMPOSITIONAL_TAGS for t in s.tags)
    counts = Counter(t[0] for t in s.tags)
    assert set(counts) == set(COMPOSITIONAL_TAGS)
    assert all(25 <= c <= 45 for c in counts.values()), counts
    assert s.tag_names() == sorted(COMPOSITIONAL_TAGS)
    # round-robin order: a small subset already covers every category
    assert set(s.subset(12).tag_names()) == set(COMPOSITIONAL_TAGS)


def test_builtin_set_grammar():
    s = BUILTIN_SETS["compositional"]
    for p in s.prompts:
        assert p.startswith("a photo of ")
        assert not re.search(r"\ba [aeiou]", p), p
        assert not re.search(r"\ban [^aeiou\s]", p), p
    assert "a photo of an apple" in s.prompts
    assert "a photo of an umbrella" in s.prompts
    assert any(" an orange " in p for p in s.prompts)

    plurals = set(_PLURALS.values())
    counting = [p for p, t in zip(s.prompts, s.tags) if t == ("counting",)]
    for p in counting:
        m = re.fullmatch(r"a photo of (two|three|four) (.+)", p)
        assert m and m.group(2) in plurals, p
    assert {"two", "three", "four"} <= {p.split()[3] for p in counting}


def test_builtin_set_pairs_differ():
    s = BUILTIN_SETS["compositional"]
    objects = sorted(_PLURALS, key=len, reverse=True)  # "teddy bear" before "bear"-like prefixes
    obj = "|".join(map(re.escape, objects))
    col = "red|blue|green|yellow|black|white|purple|orange"
    for p, (tag,) in zip(s.prompts, s.tags):
        if tag == "two_object":
            m = re.fullmatch(rf"a photo of an? ({obj}) and an? ({obj})", p)
            assert m and m.group(1) != m.group(2), p
        elif tag == "position":
            m = re.fullmatch(rf"a photo of an? ({obj}) (?:to the left of|to the right of|above|below) an? ({obj})", p)
            assert m and m.group(1) != m.group(2), p
        elif tag == "color_attr":
            m = re.fullmatch(rf"a photo of an? ({col}) ({obj}) and an? ({col}) ({obj})", p)
            assert m and m.group(1) != m.group(3) and m.group(2) != m.group(4), p


def test_builtin_hash_is_content_only():
    s = load_prompt_set("builtin:compositional")
    assert s.hash == load_prompt_set("compositional").hash
    assert re.fullmatch(r"[0-9a-f]{16}", s.hash)
    rebuilt = prompt_set_from_list(list(s.prompts), "somewhere else", tags=[list(t) for t in s.tags])
    assert rebuilt.source == "somewhere else"
    assert rebuilt.hash == s.hash


def test_hash_changes_with_content_and_order():
    base = prompt_set_from_list(["a cat", "a dog"], "x")
    assert prompt_set_from_list(["a cat", "a dog"], "y").hash == base.hash
    assert prompt_set_from_list(["a cat", "a dogs"], "x").hash != base.hash
    assert prompt_set_from_list(["a dog", "a cat"], "x").hash != base.hash
    assert prompt_set_from_list(["a cat", "a dog"], "x", tags=[["t"], []]).hash != base.hash


def test_subset_and_limit():
    s = prompt_set_from_list(["a", "b", "c"], "list", tags=[["x"], ["y"], []])
    sub = s.subset(2)
    assert sub.prompts == ("a", "b") and sub.tags == (("x",), ("y",))
    assert sub.source == "list (first 2)"
    assert len(sub) == 2
    assert s.subset(3) is s and s.subset(10) is s
    assert s.with_limit(None) is s
    assert s.with_limit(1).prompts == ("a",)
    with pytest.raises(ValueError, match="eval.prompts"):
        s.subset(0)


def test_prompt_set_is_frozen_and_validated():
    s = PromptSet(["a"], [["t"]], "direct")  # lists are turned into tuples
    assert s.prompts == ("a",) and s.tags == (("t",),)
    with pytest.raises(AttributeError):
        s.source = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="eval.prompts"):
        PromptSet(("a", "b"), ((),), "direct")


def test_from_list_errors():
    with pytest.raises(ValueError, match=r"eval\.prompts: run captions holds no prompts"):
        prompt_set_from_list([], "run captions")
    with pytest.raises(ValueError, match=r"eval\.prompts: .*prompt 1"):
        prompt_set_from_list(["a", ""], "caps")
    with pytest.raises(ValueError, match=r"eval\.prompts: .*2 prompts but 1"):
        prompt_set_from_list(["a", "b"], "caps", tags=[[]])


# ----------------------------------------------------------------------------- files


def test_text_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# header comment\n\n  a photo of a cat  \n\t\n#another\na photo of a dog\n", encoding="utf-8")
    s = load_prompt_set(str(path))
    assert s.prompts == ("a photo of a cat", "a photo of a dog")
    assert s.tags == ((), ())
    assert s.source == str(path)
    # any other suffix is text too
    other = tmp_path / "prompts.list"
    other.write_text("one\ntwo\n", encoding="utf-8")
    assert load_prompt_set(str(other)).prompts == ("one", "two")


def test_jsonl_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "a cat", "tags": "animal"}, {"prompt": "a red car", "tags": ["colors", "vehicle"]},
            {"prompt": "a cup"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n", encoding="utf-8")
    s = load_prompt_set(str(path))
    assert s.prompts == ("a cat", "a red car", "a cup")
    assert s.tags == (("animal",), ("colors", "vehicle"), ())
    assert s.tag_names() == ["animal", "colors", "vehicle"]


def test_parquet_default_and_selected_column(tmp_path):
    path = tmp_path / "prompts.parquet"
    _write_parquet(path, id=[1, 2], caption=["a cat", "a dog"], text=["t1", "t2"])
    s = load_prompt_set(str(path))
    assert s.prompts == ("a cat", "a dog") and s.tags == ((), ())
    sel = load_prompt_set(f"{path}#text")
    assert sel.prompts == ("t1", "t2")
    assert sel.source == f"{path}#text"


def test_parquet_tags_column_and_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    _write_parquet(folder / "part-0.parquet", prompt=["a cat", "a dog"],
                   tags=pa.array([["animal"], []], type=pa.list_(pa.string())))
    _write_parquet(folder / "part-1.parquet", prompt=["a car"], tags=pa.array([["vehicle", "red"]]))
    (folder / "_SUCCESS").write_text("")
    s = load_prompt_set(str(folder))
    assert s.prompts == ("a cat", "a dog", "a car")
    assert s.tags == (("animal",), (), ("vehicle", "red"))

    single = tmp_path / "string_tags.parquet"
    _write_parquet(single, prompt=["a cat", "a dog"], tags=["animal", None])
    assert load_prompt_set(str(single)).tags == (("animal",), ())


def test_memory_jsonl(mem_root):
    fs, root = mem_root
    with fs.open(f"{root}/p.jsonl", "w") as f:
        f.write('{"prompt": "a cat", "tags": ["animal"]}\n{"prompt": "a bus"}\n')
    s = load_prompt_set(f"memory://{root}/p.jsonl")
    assert s.prompts == ("a cat", "a bus")
    assert s.tags == (("animal",), ())
    assert s.hash == prompt_set_from_list(["a cat", "a bus"], "x", tags=[["animal"], []]).hash


def test_memory_parquet_with_column(mem_root):
    fs, root = mem_root
    with fs.open(f"{root}/p.parquet", "wb") as f:
        pq.write_table(pa.table({"caption": ["a cat"], "prompt": ["ignored"]}), f)
    assert load_prompt_set(f"memory://{root}/p.parquet#caption").prompts == ("a cat",)
    assert load_prompt_set(f"memory://{root}/p.parquet").prompts == ("ignored",)


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path, mem_root):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=rf"^eval\.prompts: .*{re.escape(str(missing))}"):
        load_prompt_set(str(missing))
    _, root = mem_root
    with pytest.raises(FileNotFoundError, match=rf"^eval\.prompts: .*memory://{root}/gone\.jsonl"):
        load_prompt_set(f"memory://{root}/gone.jsonl")
    with pytest.raises(FileNotFoundError, match=r"^train\.captions: .*nope\.parquet"):
        load_prompt_set(str(tmp_path / "nope.parquet#caption"), field="train.captions")


def test_unknown_builtin():
    with pytest.raises(ValueError, match=r"^eval\.prompts: .*'geneval'.*builtin:compositional"):
        load_prompt_set("builtin:geneval")


@pytest.mark.parametrize("name,content", [("empty.txt", "# only a comment\n\n   \n"), ("empty.jsonl", "\n\n")])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^eval\.prompts: {re.escape(str(path))} holds no prompts"):
        load_prompt_set(str(path))


@pytest.mark.parametrize("bad_line,what", [
    ("{not json", "not valid JSON"),
    ('{"text": "a cat"}', "prompt"),
    ('{"prompt": 3}', "prompt"),
    ('["a cat"]', "prompt"),
    ('{"prompt": "a cat", "tags": 5}', "tags"),
    ('{"prompt": "a cat", "tags": ["ok", 1]}', "tags"),
])
def test_jsonl_bad_line(tmp_path, bad_line, what):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n\n' + bad_line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^eval\.prompts: {re.escape(str(path))} line 3: .*{what}"):
        load_prompt_set(str(path))


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "cols.parquet"
    _write_parquet(path, id=[1], label=["x"])
    with pytest.raises(ValueError, match=rf"^eval\.prompts: {re.escape(str(path))} .*columns: id, label"):
        load_prompt_set(str(path))
    with pytest.raises(ValueError, match=rf"^eval\.prompts: {re.escape(str(path))} has no column 'caption'.*id, label"):
        load_prompt_set(f"{path}#caption")


@pytest.mark.parametrize("values", [["a cat", None], ["a cat", "  "]])
def test_parquet_bad_prompt(tmp_path, values):
    path = tmp_path / "bad.parquet"
    _write_parquet(path, caption=values)
    with pytest.raises(ValueError, match=rf"^eval\.prompts: {re.escape(str(path))} row 1 column 'caption'"):
        load_prompt_set(str(path))


def test_parquet_non_string_prompt_and_bad_tags(tmp_path):
    path = tmp_path / "ints.parquet"
    _write_parquet(path, prompt=[7])
    with pytest.raises(ValueError, match=r"^eval\.prompts: .*ints\.parquet row 0 column 'prompt'"):
        load_prompt_set(str(path))
    tags = tmp_path / "tags.parquet"
    _write_parquet(tags, prompt=["a", "b"], tags=[1, 2])
    with pytest.raises(ValueError, match=r"^eval\.prompts: .*tags\.parquet row 0 column 'tags'"):
        load_prompt_set(str(tags))


def test_selector_on_text_and_empty_folder(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"^eval\.prompts: .*only applies to Parquet.*p\.txt"):
        load_prompt_set(f"{path}#caption")
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(ValueError, match=rf"^eval\.prompts: folder {re.escape(str(empty))} holds no \.parquet"):
        load_prompt_set(str(empty))


def test_not_parquet(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text("not parquet", encoding="utf-8")
    with pytest.raises(ValueError, match=r"^eval\.prompts: .*fake\.parquet is not a readable Parquet file"):
        load_prompt_set(str(path))
