"""Where training images and captions come from: the built-in digits, an ``imagefolder``, or Parquet.

A source hands the driver two small things: a *fingerprint* (what the cache key hashes) and a *plan*
(which rows exist, their captions, labels and where their image bytes live). Image bytes are read and
decoded later, inside Ray tasks (``data/preprocess.py``). Paths are local or fsspec URIs.

Fingerprint policy: the listing of the source (relative names and sizes) always counts. When all
listed files together are at most ``CONTENT_HASH_LIMIT`` bytes, every file's content is hashed (exact:
touching a file without changing it keeps the key, changing one byte changes it). Above that, each
file contributes what the filesystem reports instead of its bytes: an ETag / md5 / crc32c /
generation on object stores, the modification time on local disks (cheap, and any rewrite changes
it). The imagefolder's metadata file is always hashed by content.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from apexdistill.config import DataConfig

CONTENT_HASH_LIMIT = 64 * 2**20  # bytes; above this the fingerprint uses file metadata (see module doc)
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_INFO_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "generation", "mtime", "LastModified", "last_modified", "created")
_DRIVE = re.compile(r"^[A-Za-z]:")


class SourceError(ValueError):
    """A source that cannot be used at all (missing folder, no metadata, unknown column)."""


# ----------------------------------------------------------------------------- filesystems


def open_fs(uri: str) -> tuple[Any, str]:
    """``uri`` (local path or fsspec URI) -> (fsspec filesystem, path on it, without protocol)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if is_local_fs(fs):
        path = os.path.abspath(path)
    return fs, path.rstrip("/") or "/"


def is_local_fs(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def worker_visible(fs: Any) -> bool:
    """False for process-local filesystems (``memory://``): Ray workers are other processes and cannot
    see the driver's in-memory store, so the driver moves those bytes itself."""
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "memory" not in protocol


def arrow_fs(fs: Any) -> Any:
    """A pyarrow filesystem over any fsspec one (what Ray Data's readers and writers take)."""
    import pyarrow.fs as pafs

    if is_local_fs(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def list_files(fs: Any, root: str, skip_hidden: bool = False) -> dict[str, dict[str, Any]]:
    """Relative name -> info for every file under ``root``."""
    out = {}
    for name, info in fs.find(root, detail=True).items():
        if info.get("type") == "directory":
            continue
        rel = name[len(root.rstrip("/")) + 1 :] if name.startswith(root.rstrip("/") + "/") else posixpath.basename(name)
        if skip_hidden and any(part.startswith(".") for part in rel.split("/")):
            continue
        out[rel] = info
    return out


def listing_fingerprint(fs: Any, root: str, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Digest of a listing: content hashes when small, else sizes + ETag/mtime (see module doc)."""
    total = sum(int(info.get("size") or 0) for info in files.values())
    by_content = total <= CONTENT_HASH_LIMIT
    h = hashlib.sha256()
    for rel in sorted(files):
        info = files[rel]
        h.update(f"{rel}\0{info.get('size')}\0".encode())
        if by_content:
            h.update(hashlib.sha256(fs.cat_file(f"{root}/{rel}")).digest())
        else:
            stamp = next((info[k] for k in _INFO_KEYS if info.get(k) is not None), "")
            h.update(str(stamp).encode())
    return {"files": len(files), "bytes": total, "method": "content" if by_content else "size+etag/mtime", "digest": h.hexdigest()}


# ----------------------------------------------------------------------------- plans


@dataclass
class SourcePlan:
    """What the Ray pipeline reads. ``kind`` picks the decode path:

    - ``digits``: rows {row_id, caption, label, pixels (64 values 0..16)}
    - ``files``: rows {row_id, caption, label, file, path (on ``fs``; "" when inline), data (bytes the
      driver read from a process-local store; b"" otherwise)}
    - ``parquet``: rows {file, row_group, row_offset, take}: one task reads one row group
    """

    kind: str
    rows: list[dict[str, Any]]
    fs: Any = None
    rejects: list[dict[str, str]] = field(default_factory=list)  # rows rejected on the driver (``reject``), never read
    total_rows: int = 0  # source rows considered (good + rejected), after data.limit


Problem = tuple[str, str]  # (reason, detail): reason is a short category used in summaries


def reject(row_id: str, file: str, problem: Problem) -> dict[str, str]:
    return {"row_id": row_id, "file": file, "reason": problem[0], "detail": problem[1]}


def check_member(root: str, file_name: Any, fs: Any) -> tuple[str | None, Problem | None]:
    """Resolve a metadata ``file_name`` inside ``root``: (path, None) or (None, problem). Absolute
    names, URLs, ``..`` escapes and (locally) links leading out of the root are refused unread."""
    if not isinstance(file_name, str) or not file_name.strip():
        return None, ("bad_metadata", "file_name is empty")
    name = file_name.strip()
    if "\0" in name:
        return None, ("bad_metadata", "file_name contains a NUL byte")
    if name.startswith(("/", "\\")) or _DRIVE.match(name) or "://" in name:
        return None, ("outside_root", f"file_name '{name}' is absolute; it must be relative to the dataset root (not read)")
    rel = posixpath.normpath(name.replace("\\", "/"))
    if rel == ".." or rel.startswith("../") or rel == ".":
        return None, ("outside_root", f"file_name '{name}' points outside the dataset root (not read)")
    path = f"{root}/{rel}"
    if is_local_fs(fs):
        real_root = os.path.realpath(root)
        if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
            return None, ("outside_root", f"file_name '{name}' resolves outside the dataset root through a link (not read)")
    return path, None


def caption_problem(caption: Any) -> Problem | None:
    if caption is None or (isinstance(caption, str) and not caption.strip()):
        return ("empty_caption", "the caption is empty")
    if not isinstance(caption, str):
        return ("empty_caption", f"the caption is a {type(caption).__name__}, not text")
    return None


def parse_label(value: Any) -> int | None:
    """An integer label, -1 for none, None when the value is not an integer."""
    if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and np.isnan(value)):
        return -1
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        return None
    return int(as_float) if as_float.is_integer() else None


class Source:
    """Base: ``fingerprint()`` for the cache key, ``plan()`` for the pipeline."""

    kind = ""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg

    def describe(self) -> str:
        return self.kind

    def fingerprint(self) -> dict[str, Any]:
        raise NotImplementedError

    def plan(self) -> SourcePlan:
        raise NotImplementedError


class DigitsSource(Source):
    """scikit-learn's handwritten digits, the train split of ``data/digits.py``."""

    kind = "digits"

    def _rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        idx = np.arange(len(digits.target))
        train_idx, _ = train_test_split(idx, test_size=self.cfg.test_fraction, random_state=self.cfg.split_seed, stratify=digits.target)
        rows = np.sort(train_idx)[: self.cfg.limit]
        return rows, digits.images[rows].astype(np.float32), digits.target[rows].astype(np.int64)

    def describe(self) -> str:
        return f"digits (train split, test_fraction={self.cfg.test_fraction}, split_seed={self.cfg.split_seed})"

    def fingerprint(self) -> dict[str, Any]:
        import sklearn

        rows, images, labels = self._rows()
        h = hashlib.sha256(rows.tobytes() + images.tobytes() + labels.tobytes()).hexdigest()
        return {"kind": "digits", "sklearn": sklearn.__version__, "test_fraction": self.cfg.test_fraction,
                "split_seed": self.cfg.split_seed, "limit": self.cfg.limit, "rows": int(len(rows)), "digest": h}

    def plan(self) -> SourcePlan:
        from apexdistill.data.digits import caption_for

        rows, images, labels = self._rows()
        items = [
            {"row_id": f"digits/{int(r):04d}", "caption": caption_for(int(l)), "label": int(l), "pixels": img.reshape(-1).tolist()}
            for r, img, l in zip(rows, images, labels)
        ]
        return SourcePlan("digits", items, total_rows=len(items))


class ImageFolderSource(Source):
    """Images plus ``metadata.jsonl`` (one JSON object a line) or ``metadata.csv`` at the root, each
    row with ``file_name`` (relative to the root) and a caption column (``data.caption_column``)."""

    kind = "imagefolder"

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self.uri = str(cfg.path)
        self.fs, self.root = open_fs(self.uri)
        if not self.fs.isdir(self.root):
            raise SourceError(f"data.path: '{self.uri}' is not a folder (data.source='imagefolder')")
        present = [m for m in METADATA_FILES if self.fs.isfile(f"{self.root}/{m}")]
        if not present:
            raise SourceError(f"data.path: '{self.uri}' has no metadata.jsonl or metadata.csv (with file_name and {cfg.caption_column} columns)")
        if len(present) > 1:
            raise SourceError(f"data.path: '{self.uri}' has both metadata.jsonl and metadata.csv; keep one")
        self.metadata = present[0]

    def describe(self) -> str:
        return f"imagefolder {self.uri} ({self.metadata})"

    def fingerprint(self) -> dict[str, Any]:
        files = list_files(self.fs, self.root)
        meta = hashlib.sha256(self.fs.cat_file(f"{self.root}/{self.metadata}")).hexdigest()
        return {"kind": "imagefolder", "metadata": meta, "caption_column": self.cfg.caption_column,
                "label_column": self.cfg.label_column, "limit": self.cfg.limit, **listing_fingerprint(self.fs, self.root, files)}

    def _records(self) -> Iterator[tuple[int, dict[str, Any] | None, Problem | None]]:
        """(line number, record or None, problem) for each metadata row."""
        text = self.fs.cat_file(f"{self.root}/{self.metadata}").decode("utf-8-sig")
        if self.metadata.endswith(".csv"):
            reader = csv.DictReader(io.StringIO(text))
            if reader.fieldnames is None or "file_name" not in reader.fieldnames:
                raise SourceError(f"{self.uri}/{self.metadata}: needs a 'file_name' column, found {reader.fieldnames}")
            if self.cfg.caption_column not in reader.fieldnames:
                raise SourceError(f"{self.uri}/{self.metadata}: no caption column '{self.cfg.caption_column}' (data.caption_column); found {reader.fieldnames}")
            for i, rec in enumerate(reader, start=2):
                yield i, rec, None
            return
        seen_caption = False
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                yield i, None, ("bad_metadata", f"metadata line {i} is not valid JSON ({exc.msg})")
                continue
            if not isinstance(rec, dict):
                yield i, None, ("bad_metadata", f"metadata line {i} is not a JSON object")
                continue
            seen_caption |= self.cfg.caption_column in rec
            yield i, rec, None
        if not seen_caption:
            raise SourceError(f"{self.uri}/{self.metadata}: no row has the caption column '{self.cfg.caption_column}' (data.caption_column)")

    def plan(self) -> SourcePlan:
        files = list_files(self.fs, self.root)
        inline = not worker_visible(self.fs)
        rows: list[dict[str, Any]] = []
        rejects: list[dict[str, str]] = []
        used: dict[str, int] = {}
        total = 0
        for line, rec, problem in self._records():
            if self.cfg.limit is not None and total >= self.cfg.limit:
                break
            total += 1
            name = rec.get("file_name") if rec else None
            base_id = name if isinstance(name, str) and name.strip() else f"{self.metadata}:{line}"
            used[base_id] = used.get(base_id, 0) + 1
            row_id = base_id if used[base_id] == 1 else f"{base_id}#{used[base_id] - 1}"
            if problem or rec is None:
                rejects.append(reject(row_id, "", problem or ("bad_metadata", "unreadable metadata row")))
                continue
            path, problem = check_member(self.root, name, self.fs)
            label = parse_label(rec.get(self.cfg.label_column)) if self.cfg.label_column else -1
            caption = rec.get(self.cfg.caption_column)
            if path is not None and path[len(self.root) + 1 :] not in files:
                problem = ("missing_file", f"'{name}' does not exist under the dataset root")
            if problem is None and label is None:
                problem = ("bad_label", f"label {rec.get(self.cfg.label_column)!r} is not an integer")
            problem = problem or caption_problem(caption)
            if problem or path is None:
                rejects.append(reject(row_id, str(name or ""), problem or ("bad_metadata", "no file_name")))
                continue
            # bytes inline only for process-local stores; otherwise the decode task reads the path
            data = self.fs.cat_file(path) if inline else b""
            rows.append({"row_id": row_id, "caption": caption, "label": label, "file": name, "path": "" if inline else path, "data": data})
        return SourcePlan("files", rows, fs=self.fs, rejects=rejects, total_rows=total)


class ParquetSource(Source):
    """One Parquet file or a folder of them, with encoded image bytes (``data.image_column``, bytes or
    a ``{bytes, path}`` struct as Hugging Face datasets write it) and captions (``data.caption_column``)."""

    kind = "parquet"

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self.uri = str(cfg.path)
        self.fs, self.root = open_fs(self.uri)
        if self.fs.isfile(self.root):
            self.files = {posixpath.basename(self.root): self.fs.info(self.root)}
            self.base = posixpath.dirname(self.root)
        elif self.fs.isdir(self.root):
            self.files = {k: v for k, v in list_files(self.fs, self.root).items() if k.endswith(".parquet") and not posixpath.basename(k).startswith(("_", "."))}
            self.base = self.root
        else:
            raise SourceError(f"data.path: '{self.uri}' does not exist (data.source='parquet')")
        if not self.files:
            raise SourceError(f"data.path: '{self.uri}' holds no .parquet files")

    def describe(self) -> str:
        return f"parquet {self.uri} ({len(self.files)} file(s))"

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "parquet", "image_column": self.cfg.image_column, "caption_column": self.cfg.caption_column,
                "label_column": self.cfg.label_column, "limit": self.cfg.limit, **listing_fingerprint(self.fs, self.base, self.files)}

    def _columns(self, schema_names: list[str], rel: str) -> list[str]:
        for col, fld in ((self.cfg.image_column, "data.image_column"), (self.cfg.caption_column, "data.caption_column")):
            if col not in schema_names:
                raise SourceError(f"{self.uri}: file '{rel}' has no column '{col}' ({fld}); columns: {schema_names}")
        cols = [self.cfg.image_column, self.cfg.caption_column]
        if self.cfg.label_column and self.cfg.label_column in schema_names:
            cols.append(self.cfg.label_column)
        return cols

    def plan(self) -> SourcePlan:
        import pyarrow.parquet as pq

        fragments: list[dict[str, Any]] = []
        left = self.cfg.limit
        total = 0
        for rel in sorted(self.files):
            if left is not None and left <= 0:
                break
            with self.fs.open(f"{self.base}/{rel}", "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                cols = self._columns(meta.schema.to_arrow_schema().names, rel)
            offset = 0
            for rg in range(meta.num_row_groups):
                n = meta.row_group(rg).num_rows
                take = n if left is None else min(n, left)
                if take > 0:
                    fragments.append({"file": rel, "row_group": rg, "row_offset": offset, "take": take, "columns": cols})
                    total += take
                    if left is not None:
                        left -= take
                offset += n
        if worker_visible(self.fs):
            return SourcePlan("parquet", fragments, fs=self.fs, total_rows=total)
        # a process-local store (memory://): the driver reads the bytes, tasks only decode them
        rows, rejects = [], []
        for frag in fragments:
            for row in read_parquet_fragment(self.fs, self.base, frag, self.cfg):
                reason, detail = row.pop("reason"), row.pop("detail")
                if reason:
                    rejects.append(reject(row["row_id"], row["file"], (reason, detail)))
                else:
                    rows.append({**row, "path": ""})
        return SourcePlan("files", rows, fs=self.fs, rejects=rejects, total_rows=total)


def read_parquet_fragment(fs: Any, base: str, frag: dict[str, Any], cfg: DataConfig) -> list[dict[str, Any]]:
    """One row group -> plan rows with inline bytes (``data``); unusable rows carry a ``reason``."""
    import pyarrow.parquet as pq

    with fs.open(f"{base}/{frag['file']}", "rb") as fh:
        table = pq.ParquetFile(fh).read_row_group(frag["row_group"], columns=frag["columns"]).slice(0, frag["take"])
    images = table.column(cfg.image_column).to_pylist()
    captions = table.column(cfg.caption_column).to_pylist()
    labels = table.column(cfg.label_column).to_pylist() if cfg.label_column in table.column_names else [None] * table.num_rows
    rows = []
    for i, (image, caption, label) in enumerate(zip(images, captions, labels)):
        row_id = f"{frag['file']}#{frag['row_offset'] + i}"
        if isinstance(image, dict):  # Hugging Face datasets' Image feature: {bytes, path}
            image = image.get("bytes")
        problem: Problem | None = None if isinstance(image, (bytes, bytearray)) and image else ("no_image", f"column '{cfg.image_column}' holds no image bytes")
        lab = parse_label(label)
        if problem is None and lab is None:
            problem = ("bad_label", f"label {label!r} is not an integer")
        problem = problem or caption_problem(caption)
        rows.append({"row_id": row_id, "caption": caption if isinstance(caption, str) else "", "label": lab if lab is not None else -1,
                     "file": frag["file"], "data": b"" if problem else bytes(image),
                     "reason": problem[0] if problem else "", "detail": problem[1] if problem else ""})
    return rows


SOURCES: dict[str, type[Source]] = {"digits": DigitsSource, "imagefolder": ImageFolderSource, "parquet": ParquetSource}


def build_source(cfg: DataConfig) -> Source:
    return SOURCES[cfg.source](cfg)
