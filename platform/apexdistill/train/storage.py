"""Run folders and checkpoints on object storage (``run.storage_uri``), through ``pyarrow.fs``.

Layout under ``run.storage_uri`` (``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``, ``file://...``
or any fsspec URI, wrapped in ``pyarrow.fs.PyFileSystem``)::

    <storage>/runs/<name>/config.yaml, data_shapes.json, mlflow_run.json
    <storage>/runs/<name>/checkpoints/step_<N>/...           every rank's files of step N
    <storage>/runs/<name>/checkpoints/step_<N>/manifest.json written last by rank 0: every file and size
    <storage>/ray_results/<name>/                            Ray Train's own run state (storage_path)

Object stores have no atomic rename, so a checkpoint is complete only when its ``manifest.json``
exists and every file it lists is there with that size: a publish that dies half-way leaves a
folder that is never resumed from (and is removed by the next publish), and the previous complete
checkpoint stays as it was. Each rank writes into its own local temp folder and uploads its own
files, so the nodes need no shared disk for checkpoints. Ray gets a small pointer checkpoint
(``pointer.json``, the step folder's URI): its restart and resume logic works as on a local disk,
while the weights are uploaded once.

Credentials and endpoint come from the provider's standard environment, never from the config
(which is logged to MLflow): ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_REGION`` / ``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` for S3 (or ``run.storage_endpoint``
for an S3-compatible store such as MinIO), ``GOOGLE_APPLICATION_CREDENTIALS`` for GCS.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

MANIFEST = "manifest.json"
POINTER = "pointer.json"
CHECKPOINTS = "checkpoints"
#: what export / sample / evaluate need from a checkpoint (not the sharded training state or RNG streams)
WEIGHT_SKIP = ("sharded/", "deepspeed/", "rng_rank")
_NATIVE = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "hdfs": "hdfs", "viewfs": "hdfs", "file": "file"}


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def open_storage(uri: str, endpoint: str | None = None) -> tuple[Any, str]:
    """``uri`` -> (pyarrow filesystem, path on it). S3, GCS, HDFS and local files use pyarrow's own
    filesystems; any other scheme goes through fsspec. ``endpoint``: an S3-compatible endpoint
    (http://host:port); otherwise ``AWS_ENDPOINT_URL`` or AWS itself."""
    import pyarrow.fs as pafs

    scheme, _, rest = uri.partition("://")
    if scheme == "s3" and endpoint:
        return pafs.S3FileSystem(endpoint_override=endpoint), rest.rstrip("/")
    if scheme in _NATIVE:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/")
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path.rstrip("/")


@dataclass
class RunStorage:
    """One run's folder on a storage URI: ``<storage_uri>/runs/<name>``."""

    uri: str  # run.storage_uri
    name: str
    endpoint: str | None = None

    def __post_init__(self) -> None:
        self.fs, self.base = open_storage(self.uri, self.endpoint)
        self.root = posixpath.join(self.base, "runs", self.name)

    @classmethod
    def from_config(cls, cfg: Any) -> "RunStorage | None":
        if not cfg.run.storage_uri:
            return None
        return cls(cfg.run.storage_uri, cfg.run.name, cfg.run.storage_endpoint)

    @property
    def run_uri(self) -> str:
        return f"{self.uri.rstrip('/')}/runs/{self.name}"

    @property
    def ray_storage_path(self) -> str:
        """Ray Train's ``storage_path`` on ``self.fs`` (with ``storage_filesystem=self.fs``)."""
        return posixpath.join(self.base, "ray_results")

    def step_path(self, step: int) -> str:
        return posixpath.join(self.root, CHECKPOINTS, f"step_{step:08d}")

    def to_uri(self, path: str) -> str:
        return f"{self.uri.rstrip('/')}/{path[len(self.base) + 1:]}"

    # ---------------------------------------------------------------- files

    def put_file(self, local: Path, rel: str) -> None:
        self.upload(local, posixpath.join(self.root, rel))

    def put_bytes(self, rel: str, data: bytes) -> None:
        path = posixpath.join(self.root, rel)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        with self.fs.open_output_stream(path) as fh:
            fh.write(data)

    def check_writable(self, config_text: str) -> None:
        """Write the run's config.yaml: the first thing a run does there, before Ray or any worker
        starts; an error names run.storage_uri and what to check."""
        try:
            self.put_bytes("config.yaml", config_text.encode())
        except OSError as exc:
            raise ValueError(f"run.storage_uri='{self.uri}': cannot write {self.run_uri}/config.yaml ({exc}); check the bucket, "
                             "the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) and "
                             "the endpoint (run.storage_endpoint or AWS_ENDPOINT_URL)") from None

    def get_file(self, rel: str, local: Path) -> bool:
        """Download ``rel`` of the run folder to ``local``; False when it does not exist."""
        import pyarrow.fs as pafs

        path = posixpath.join(self.root, rel)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return False
        self.download(path, local)
        return True

    def upload(self, local: Path, path: str) -> int:
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        with open(local, "rb") as src, self.fs.open_output_stream(path) as dst:
            shutil.copyfileobj(src, dst, 8 * 2**20)
        return local.stat().st_size

    def download(self, path: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        with self.fs.open_input_stream(path) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 * 2**20)

    def _sizes(self, folder: str) -> dict[str, int]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True, recursive=True))
        return {i.path[len(folder) + 1 :]: i.size for i in infos if i.type == pafs.FileType.File}

    def read_manifest(self, folder: str) -> dict[str, Any] | None:
        """The manifest of a complete checkpoint folder, or None (absent, unreadable, a file missing
        or of another size)."""
        try:
            with self.fs.open_input_stream(posixpath.join(folder, MANIFEST)) as fh:
                manifest = json.loads(fh.read())
        except (OSError, ValueError):
            return None
        present = self._sizes(folder)
        if any(present.get(rel) != size for rel, size in manifest.get("files", {}).items()):
            return None
        return manifest

    # ---------------------------------------------------------------- checkpoints

    def step_folders(self) -> list[str]:
        import pyarrow.fs as pafs

        root = posixpath.join(self.root, CHECKPOINTS)
        infos = self.fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.Directory and posixpath.basename(i.path).startswith("step_"))

    def latest(self) -> str | None:
        """The newest complete checkpoint folder (path on ``fs``), or None."""
        for folder in reversed(self.step_folders()):
            if self.read_manifest(folder) is not None:
                return folder
        return None

    def upload_tree(self, local: Path, folder: str) -> dict[str, int]:
        """Every file under ``local`` to ``folder``: {relative name: size}."""
        files = {}
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = f.relative_to(local).as_posix()
            files[rel] = self.upload(f, posixpath.join(folder, rel))
        return files

    def commit(self, folder: str, step: int, files: dict[str, int], keep: int) -> None:
        """Rank 0, after every rank uploaded: the manifest (last), then older checkpoints beyond ``keep``
        are removed (manifest first, so a half-removed one is never complete)."""
        manifest = {"format": "apexdistill-checkpoint", "step": step, "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with self.fs.open_output_stream(posixpath.join(folder, MANIFEST)) as fh:
            fh.write(json.dumps(manifest, indent=2).encode())
        complete = [f for f in self.step_folders() if f != folder and self.read_manifest(f) is not None]
        for old in complete[: max(0, len(complete) - (keep - 1))]:
            self.remove(old)

    def remove(self, folder: str) -> None:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(posixpath.join(folder, MANIFEST)).type == pafs.FileType.File:
            self.fs.delete_file(posixpath.join(folder, MANIFEST))
        self.fs.delete_dir(folder)

    def discard_incomplete(self, keep_step: int | None = None) -> list[str]:
        """Remove step folders without a complete manifest (publishes that died), except ``keep_step``'s."""
        removed = []
        for folder in self.step_folders():
            if (keep_step is None or folder != self.step_path(keep_step)) and self.read_manifest(folder) is None:
                self.fs.delete_dir(folder)
                removed.append(posixpath.basename(folder))
        return removed

    def fetch(self, folder: str, local: Path, skip: tuple[str, ...] = ()) -> Path:
        """Download a complete checkpoint folder (without names starting with ``skip``) into ``local``."""
        manifest = self.read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(f"'{self.to_uri(folder)}' is not a complete checkpoint (no valid {MANIFEST})")
        for rel in manifest["files"]:
            if not rel.startswith(skip):
                self.download(posixpath.join(folder, rel), local / rel)
        return local


def publish_remote(storage: RunStorage, step: int, write: Callable[[Path], None], keep: int, rank: int,
                   before_commit: Callable[[str], None] | None = None) -> str:
    """Every rank writes into its own local temp folder and uploads what it wrote; after a barrier
    rank 0 writes the manifest (last) and prunes. ``before_commit(folder_uri)`` runs on rank 0 after
    the uploads and before the manifest: a hook for tests that simulate a crash there. Returns the
    step folder's URI."""
    import torch.distributed as dist

    from apexdistill.train.strategy import barrier, distributed

    folder = storage.step_path(step)
    if rank == 0:
        storage.discard_incomplete()  # leftovers of a publish that died (and an old copy of this step)
        if storage.fs.get_file_info(folder).type.name != "NotFound":
            storage.remove(folder)
    barrier()
    local = Path(tempfile.mkdtemp(prefix=f"apexdistill-ckpt-r{rank}-"))
    try:
        write(local)
        files = storage.upload_tree(local, folder)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    everyone = [files]
    if distributed():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, files)
    if rank == 0:
        merged = {k: v for part in everyone for k, v in part.items()}
        if before_commit is not None:
            before_commit(storage.to_uri(folder))
        storage.commit(folder, step, merged, keep)
    barrier()
    return storage.to_uri(folder)


def write_pointer(run_dir: Path, uri: str, step: int) -> Path:
    """A tiny local folder for ``ray.train.report`` (``<run_dir>/.pointers/step_N``): which published
    checkpoint this report is. Ray copies it to its storage; the two newest stay here."""
    root = run_dir / ".pointers"
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / POINTER).write_text(json.dumps({"uri": uri, "step": step}))
    for old in sorted(p for p in root.iterdir() if p.is_dir())[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def fetch_run(uri: str, local: Path | None = None, endpoint: str | None = None) -> Path:
    """A run folder URI (``<storage_uri>/runs/<name>``) or one of its ``checkpoints/step_*`` URIs ->
    a local run folder with config.yaml, data_shapes.json, mlflow_run.json and that (default: the
    latest complete) checkpoint's weights, laid out as a local run folder so every reader works."""
    uri = uri.rstrip("/")
    step = None
    if posixpath.basename(uri).startswith("step_") and posixpath.basename(posixpath.dirname(uri)) == CHECKPOINTS:
        step, uri = posixpath.basename(uri), posixpath.dirname(posixpath.dirname(uri))
    base, _, name = uri.rpartition("/runs/")
    if not name or "/" in name:
        raise FileNotFoundError(f"'{uri}' is not a run folder on storage (expected <run.storage_uri>/runs/<name>[/checkpoints/step_N])")
    storage = RunStorage(base, name, endpoint)
    local = local or Path(tempfile.mkdtemp(prefix=f"apexdistill-run-{name}-"))
    if not storage.get_file("config.yaml", local / "config.yaml"):
        raise FileNotFoundError(f"'{uri}' has no config.yaml: is it a run folder made by 'apexdistill train' with run.storage_uri?")
    storage.get_file("data_shapes.json", local / "data_shapes.json")
    storage.get_file("mlflow_run.json", local / "mlflow_run.json")
    folder = posixpath.join(storage.root, CHECKPOINTS, step) if step else storage.latest()
    if folder is None:
        raise FileNotFoundError(f"'{uri}' holds no finished checkpoint (expected {uri}/checkpoints/step_*/{MANIFEST})")
    storage.fetch(folder, local / CHECKPOINTS / posixpath.basename(folder), skip=WEIGHT_SKIP)
    return local
