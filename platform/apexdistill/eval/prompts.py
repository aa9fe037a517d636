"""Evaluation prompt sets: a built-in GenEval-style compositional set, and loaders for prompts kept in
text, JSONL or Parquet files (local paths or any fsspec URI), each with a content hash to tell sets apart.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = [
    "BUILTIN_SETS",
    "COMPOSITIONAL_TAGS",
    "PromptSet",
    "load_prompt_set",
    "prompt_set_from_list",
]

_FIELD = "eval.prompts"


@dataclass(frozen=True)
class PromptSet:
    """An ordered set of prompts, each with its (possibly empty) tuple of tags."""

    prompts: tuple[str, ...]
    tags: tuple[tuple[str, ...], ...]
    source: str

    def __post_init__(self) -> None:
        # Callers may hand in lists; tuples keep the set hashable and immutable as the dataclass promises.
        prompts = tuple(self.prompts)
        tags = tuple(tuple(t) for t in self.tags)
        if len(tags) != len(prompts):
            raise ValueError(f"{_FIELD}: {self.source} has {len(prompts)} prompts but {len(tags)} tag lists")
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "tags", tags)

    @property
    def hash(self) -> str:
        """First 16 hex digits of sha256 over the prompts and tags in order; the source plays no part, so
        the same prompts read from different files compare equal."""
        canonical = json.dumps([[p, list(t)] for p, t in zip(self.prompts, self.tags)],
                               ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, n: int) -> PromptSet:
        """The first ``n`` prompts (``self`` when ``n`` covers the whole set)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{_FIELD}: a prompt subset needs a positive integer size, got {n!r}")
        if n >= len(self.prompts):
            return self
        return PromptSet(self.prompts[:n], self.tags[:n], f"{self.source} (first {n})")

    def with_limit(self, limit: int | None) -> PromptSet:
        """``subset(limit)``, or ``self`` when there is no limit."""
        return self if limit is None else self.subset(limit)

    def tag_names(self) -> list[str]:
        """The distinct tags, sorted."""
        return sorted({tag for tags in self.tags for tag in tags})


# ----------------------------------------------------------------------------- built-in compositional set

COMPOSITIONAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

# COCO-style objects. 30 rather than 20 so that single_object (one prompt per object) reaches the same
# ~1/6 share as the other categories.
_OBJECTS = (
    "cat", "dog", "bicycle", "car", "bench", "apple", "clock", "chair", "cup", "umbrella",
    "bird", "horse", "book", "banana", "vase", "laptop", "teddy bear", "bus", "bottle", "pizza",
    "knife", "elephant", "giraffe", "sheep", "cow", "boat", "train", "kite", "fork", "sandwich",
)
# Written out, not derived: English plurals are irregular enough (knives, sheep, buses) that a rule
# would produce wrong prompts sooner or later.
_PLURALS = {
    "cat": "cats", "dog": "dogs", "bicycle": "bicycles", "car": "cars", "bench": "benches",
    "apple": "apples", "clock": "clocks", "chair": "chairs", "cup": "cups", "umbrella": "umbrellas",
    "bird": "birds", "horse": "horses", "book": "books", "banana": "bananas", "vase": "vases",
    "laptop": "laptops", "teddy bear": "teddy bears", "bus": "buses", "bottle": "bottles",
    "pizza": "pizzas", "knife": "knives", "elephant": "elephants", "giraffe": "giraffes",
    "sheep": "sheep", "cow": "cows", "boat": "boats", "train": "trains", "kite": "kites",
    "fork": "forks", "sandwich": "sandwiches",
}
_COLORS = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange")
_COUNTS = ("two", "three", "four")
_POSITIONS = ("to the left of", "to the right of", "above", "below")

# Prompts per category: 30 + 5 * 34 = 200 in all.
_PER_CATEGORY = 34

# The article follows the sound, not the letter; these cover the usual exceptions in case the
# vocabulary grows ("a unicycle", "an hourglass").
_VOWEL_LETTER_CONSONANT_SOUND = ("uni", "use", "one", "eu", "ukulele")
_SILENT_H = ("hour", "honest", "honor", "heir")


def _article(word: str) -> str:
    w = word.lower()
    if w.startswith(_SILENT_H):
        return "an"
    if w.startswith(_VOWEL_LETTER_CONSONANT_SOUND):
        return "a"
    return "an" if w[:1] in "aeiou" else "a"


def _a(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _spread(items: Sequence[Any], count: int) -> list[Any]:
    """``count`` distinct items spread over ``items``: indices ``i * step mod len(items)`` for
    ``i < count``, with ``step`` the smallest integer >= len/count coprime with len (coprime, so no index
    repeats). A fixed stride rather than ``random``, so the set cannot change with the Python version."""
    n = len(items)
    if count >= n:
        return list(items)
    step = max(1, math.ceil(n / count))
    while math.gcd(step, n) != 1:
        step += 1
    return [items[(i * step) % n] for i in range(count)]


def _build_compositional() -> PromptSet:
    pairs = list(itertools.combinations(_OBJECTS, 2))
    ordered_pairs = list(itertools.permutations(_OBJECTS, 2))
    color_pairs = list(itertools.permutations(_COLORS, 2))
    by_category: dict[str, list[str]] = {
        "single_object": [f"a photo of {_a(o)}" for o in _OBJECTS],
        "two_object": [f"a photo of {_a(a)} and {_a(b)}" for a, b in _spread(pairs, _PER_CATEGORY)],
        "counting": [f"a photo of {n} {_PLURALS[o]}"
                     for o, n in _spread(list(itertools.product(_OBJECTS, _COUNTS)), _PER_CATEGORY)],
        "colors": [f"a photo of {_a(f'{c} {o}')}"
                   for o, c in _spread(list(itertools.product(_OBJECTS, _COLORS)), _PER_CATEGORY)],
        "position": [f"a photo of {_a(a)} {rel} {_a(b)}"
                     for (a, b), rel in _spread(list(itertools.product(ordered_pairs, _POSITIONS)),
                                                _PER_CATEGORY)],
        "color_attr": [f"a photo of {_a(f'{c1} {o1}')} and {_a(f'{c2} {o2}')}"
                       for (o1, o2), (c1, c2) in _spread(list(itertools.product(ordered_pairs, color_pairs)),
                                                         _PER_CATEGORY)],
    }
    # Round-robin over the categories, so that subset(n) of a quick evaluation still covers all six.
    prompts: list[str] = []
    tags: list[tuple[str, ...]] = []
    for row in itertools.zip_longest(*(by_category[c] for c in COMPOSITIONAL_TAGS)):
        for category, prompt in zip(COMPOSITIONAL_TAGS, row):
            if prompt is not None:
                prompts.append(prompt)
                tags.append((category,))
    if len(set(prompts)) != len(prompts):
        raise RuntimeError("builtin:compositional: the templates produced duplicate prompts")
    return PromptSet(tuple(prompts), tuple(tags), "builtin:compositional")


BUILTIN_SETS: dict[str, PromptSet] = {"compositional": _build_compositional()}


# ----------------------------------------------------------------------------- loading


def prompt_set_from_list(prompts: list[str], source: str, tags: list[list[str]] | None = None) -> PromptSet:
    """A PromptSet over prompts the caller already holds (for example a run's captions)."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{_FIELD}: {source} holds no prompts")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{_FIELD}: {source} prompt {i} is not a non-empty string: {p!r}")
    if tags is None:
        tag_tuples: list[tuple[str, ...]] = [()] * len(prompts)
    else:
        tags = list(tags)
        if len(tags) != len(prompts):
            raise ValueError(f"{_FIELD}: {source} has {len(prompts)} prompts but {len(tags)} tag lists")
        tag_tuples = []
        for i, t in enumerate(tags):
            norm = _norm_tags(t)
            if norm is None:
                raise ValueError(f"{_FIELD}: {source} prompt {i}: tags must be a string or a list of strings, "
                                 f"got {t!r}")
            tag_tuples.append(norm)
    return PromptSet(tuple(prompts), tuple(tag_tuples), source)


def load_prompt_set(spec: str, field: str = _FIELD) -> PromptSet:
    """Load a prompt set from ``spec``: a built-in name (``builtin:compositional`` or ``compositional``);
    a ``.jsonl`` file (objects with ``prompt`` and optional ``tags``); a ``.parquet`` file or a folder of
    them, optionally ``#column``; or any other file as text, one prompt a line, ``#`` lines comments.
    Paths may be local or any fsspec URI. Errors name ``field`` first."""
    spec = os.fspath(spec).strip()
    if not spec:
        raise ValueError(f"{field}: empty prompt set spec")
    if spec.startswith("builtin:"):
        name = spec[len("builtin:"):]
        if name not in BUILTIN_SETS:
            raise ValueError(f"{field}: unknown built-in prompt set {name!r}; built-in sets: "
                             f"{', '.join('builtin:' + k for k in sorted(BUILTIN_SETS))}")
        return BUILTIN_SETS[name]
    # A bare built-in name wins over a file of that name in the working directory: configs that say
    # "compositional" should not change meaning with the directory a job starts in.
    if spec in BUILTIN_SETS:
        return BUILTIN_SETS[spec]

    fs, path, column, display = _resolve(spec, field)
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path)
                       if p.endswith(".parquet") and not os.path.basename(p).startswith(("_", ".")))
        if not files:
            raise ValueError(f"{field}: folder {display} holds no .parquet files")
        prompts: list[str] = []
        tags: list[tuple[str, ...]] = []
        for f in files:
            p, t = _read_parquet(fs, f, _display_child(display, path, f), column, field)
            prompts += p
            tags += t
    else:
        lower = path.lower()
        if lower.endswith(".parquet"):
            prompts, tags = _read_parquet(fs, path, display, column, field)
        elif column is not None:
            raise ValueError(f"{field}: a '#column' selector only applies to Parquet files, not {display}")
        elif lower.endswith(".jsonl"):
            prompts, tags = _read_jsonl(fs, path, display, field)
        else:
            prompts, tags = _read_text(fs, path, display, field)
    if not prompts:
        raise ValueError(f"{field}: {display} holds no prompts")
    return PromptSet(tuple(prompts), tuple(tags), spec)


def _url_to_fs(spec: str, field: str):
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(spec)
    except (ImportError, ValueError) as e:  # an unknown protocol, or one whose package is not installed
        raise ValueError(f"{field}: cannot open {spec}: {e}") from e


def _resolve(spec: str, field: str):
    """(fs, path, column or None, display name). The ``#`` is a column selector only when the whole spec
    names nothing, so a file whose name holds a ``#`` still loads."""
    fs, path = _url_to_fs(spec, field)
    if fs.exists(path):
        return fs, path, None, spec
    if "#" in spec:
        base, column = spec.rsplit("#", 1)
        fs, path = _url_to_fs(base, field)
        if fs.exists(path):
            if not column.strip():
                raise ValueError(f"{field}: empty column name after '#' in {spec}")
            return fs, path, column.strip(), base
        raise FileNotFoundError(f"{field}: prompt file not found: {base}")
    raise FileNotFoundError(f"{field}: prompt file not found: {spec}")


def _display_child(display: str, root: str, child: str) -> str:
    rel = child[len(root):].lstrip("/") if child.startswith(root) else os.path.basename(child)
    return f"{display.rstrip('/')}/{rel}"


def _read_bytes(fs, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


def _decode(data: bytes, display: str, field: str) -> str:
    try:
        return data.decode("utf-8-sig")  # -sig: files saved by Windows editors start with a BOM
    except UnicodeDecodeError as e:
        raise ValueError(f"{field}: {display} is not UTF-8 text ({e})") from e


def _norm_tags(value: Any) -> tuple[str, ...] | None:
    """Tags as a tuple (blank ones dropped), or None when ``value`` is of the wrong type."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, (list, tuple)):
        return None
    if not all(isinstance(t, str) for t in value):
        return None
    return tuple(t.strip() for t in value if t.strip())


def _read_text(fs, path: str, display: str, field: str) -> tuple[list[str], list[tuple[str, ...]]]:
    prompts = []
    for line in _decode(_read_bytes(fs, path), display, field).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(line)
    return prompts, [()] * len(prompts)


def _read_jsonl(fs, path: str, display: str, field: str) -> tuple[list[str], list[tuple[str, ...]]]:
    prompts: list[str] = []
    tags: list[tuple[str, ...]] = []
    for lineno, line in enumerate(_decode(_read_bytes(fs, path), display, field).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{field}: {display} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object with a string 'prompt', got {type(obj).__name__}")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: lacks a non-empty string 'prompt'")
        norm = _norm_tags(obj.get("tags"))
        if norm is None:
            raise ValueError(f"{where}: 'tags' must be a string or a list of strings, got {obj.get('tags')!r}")
        prompts.append(prompt.strip())
        tags.append(norm)
    return prompts, tags


_DEFAULT_COLUMNS = ("prompt", "caption", "text")


def _read_parquet(fs, path: str, display: str, column: str | None,
                  field: str) -> tuple[list[str], list[tuple[str, ...]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{field}: {display} is not a readable Parquet file ({e})") from e
        if column is None:
            column = next((c for c in _DEFAULT_COLUMNS if c in names), None)
            if column is None:
                raise ValueError(f"{field}: {display} has none of the prompt columns "
                                 f"{', '.join(_DEFAULT_COLUMNS)}; its columns: {', '.join(names) or '(none)'}")
        elif column not in names:
            raise ValueError(f"{field}: {display} has no column {column!r}; its columns: "
                             f"{', '.join(names) or '(none)'}")
        use_tags = "tags" in names and column != "tags"
        table = pf.read(columns=[column, "tags"] if use_tags else [column])

    prompts: list[str] = []
    for row, value in enumerate(table.column(column).to_pylist()):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{field}: {display} row {row} column {column!r}: "
                             f"prompt is not a non-empty string: {value!r}")
        prompts.append(value.strip())
    tags: list[tuple[str, ...]] = []
    if use_tags:
        for row, value in enumerate(table.column("tags").to_pylist()):
            norm = _norm_tags(value)
            if norm is None:
                raise ValueError(f"{field}: {display} row {row} column 'tags': "
                                 f"tags must be a string or a list of strings, got {value!r}")
            tags.append(norm)
    else:
        tags = [()] * len(prompts)
    return prompts, tags
