"""Ray Data preprocessing into the Parquet cache: real local Ray (one instance for the session), real
Parquet files, real encoders (MiniLM, a tiny AutoencoderKL), local folders and ``memory://``."""

from __future__ import annotations

import io
import json
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apexdistill.config import build_config
from apexdistill.data.cache import CacheStore, cache_spec, default_cache_uri
from apexdistill.data.preprocess import (
    ENCODER_PROBE,
    EncoderProbe,
    ImageProblem,
    PreprocessError,
    decode_image_bytes,
    load_cache_tensors,
    load_image,
    prepare_image,
    read_cache,
    run_preprocess,
)
from apexdistill.data.sources import build_source, check_member

RAY_TIMEOUT = 150


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for every test in this file (start-up costs seconds), plus the encoder probe."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    probe = EncoderProbe.options(name=ENCODER_PROBE).remote()
    yield probe
    ray.kill(probe)
    if started:
        ray.shutdown()


def _constructed(probe) -> int:
    import ray

    return sum(ray.get(probe.get.remote()).values())


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    from apexdistill.models.vae import tiny_vae_config

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    AutoencoderKL(**tiny_vae_config(3)).save_pretrained(str(folder))
    return folder


def _digit_image(index: int, size: int = 24, mode: str = "L") -> Image.Image:
    """A real scikit-learn digit as a PIL image of the given mode."""
    from sklearn.datasets import load_digits

    arr = (load_digits().images[index] / 16.0 * 255).astype(np.uint8)
    img = Image.fromarray(arr, "L").resize((size, size), Image.Resampling.BILINEAR)
    if mode == "RGB":
        return Image.merge("RGB", (img, img.point(lambda v: 255 - v), img))
    if mode == "RGBA":
        rgba = img.convert("RGBA")
        rgba.putalpha(img)  # transparent background
        return rgba
    if mode == "P":
        return img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if mode == "I;16":
        return Image.fromarray(np.asarray(img).astype(np.uint16) * 257)
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _imagefolder(root: Path, rows: list[dict], images: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _cfg(workdir, *overrides):
    return build_config({}, [f"run.workdir={workdir}", *overrides])


def _rejects(uri: str) -> dict[str, str]:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(uri, "rb") as fh:
        table = pq.read_table(fh)
    return dict(zip(table.column("row_id").to_pylist(), table.column("reason").to_pylist()))


# ----------------------------------------------------------------------------- images and paths (no Ray)


def test_prepare_image_modes_resize_and_crop():
    rgba = Image.new("RGBA", (40, 20), (0, 0, 0, 0))  # fully transparent: white after flattening
    assert np.allclose(prepare_image(rgba, 3, 8), 1.0)
    assert prepare_image(rgba, 1, 8).shape == (1, 8, 8)

    wide = np.zeros((20, 40), np.uint8)
    wide[:, 10:30] = 255  # a white centre band exactly as wide as the crop: shorter side -> 8, crop the middle
    x = prepare_image(Image.fromarray(wide, "L"), 1, 8)
    assert x.shape == (1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert np.allclose(x[0, :, 2:6], 1.0, atol=0.05)

    sixteen = Image.fromarray(np.full((8, 8), 65535, np.uint16))  # 16-bit white
    assert sixteen.mode.startswith("I;16")
    assert np.allclose(prepare_image(sixteen, 1, 8), 1.0) and np.allclose(prepare_image(sixteen, 3, 8), 1.0)
    half = Image.fromarray(np.full((8, 8), 32768, np.uint16))  # precision kept: mid grey, not 8-bit rounded
    assert abs(float(prepare_image(half, 1, 8).mean()) - (32768 / 65535 * 2 - 1)) < 1e-4

    palette = _digit_image(3, mode="P")
    assert np.allclose(prepare_image(palette, 3, 16), prepare_image(palette.convert("RGB"), 3, 16))

    with pytest.raises(ImageProblem) as bad_mode:
        prepare_image(Image.new("HSV", (8, 8)), 3, 8)
    assert bad_mode.value.reason == "unsupported_mode"
    with pytest.raises(ImageProblem) as corrupt:
        decode_image_bytes(b"\x89PNG\r\n\x1a\n not really a png", 3, 8)
    assert corrupt.value.reason == "undecodable"
    assert load_image(_png(_digit_image(1, mode="RGB"))).mode == "RGB"


def test_file_names_outside_the_root_are_refused(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    root = str(tmp_path / "root")
    (tmp_path / "root").mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    (tmp_path / "root" / "link.png").symlink_to(tmp_path / "secret.png")
    for name in ("../secret.png", "a/../../secret.png", "/etc/hostname", "C:\\x.png", "s3://bucket/x.png", "link.png", ""):
        path, problem = check_member(root, name, fs)
        assert path is None and problem is not None, name
    assert check_member(root, "sub/../ok.png", fs) == (f"{root}/ok.png", None)


def test_parquet_plan_on_a_process_local_store_reads_bytes_on_the_driver():
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs = fsspec.filesystem("memory")
    uri = f"memory://pq-{uuid.uuid4().hex[:8]}"
    images = [{"bytes": _png(_digit_image(i)), "path": None} for i in range(3)] + [{"bytes": None, "path": "elsewhere.png"}]
    table = pa.table({"img": images, "caption": ["one", "", "three", "four"], "cls": [1, 2, 3, 4]})
    with fs.open(f"{uri}/train.parquet", "wb") as fh:
        pq.write_table(table, fh)
    try:
        cfg = _cfg("unused", "data.source=parquet", f"data.path={uri}", "data.image_column=img", "data.caption_column=caption", "data.label_column=cls")
        plan = build_source(cfg.data).plan()
        assert plan.kind == "files" and plan.total_rows == 4  # Ray workers cannot see memory://: bytes travel inline
        assert [r["row_id"] for r in plan.rows] == ["train.parquet#0", "train.parquet#2"] and plan.rows[0]["data"].startswith(b"\x89PNG")
        assert {r["row_id"]: r["reason"] for r in plan.rejects} == {"train.parquet#1": "empty_caption", "train.parquet#3": "no_image"}
        with pytest.raises(ValueError, match="data.image_column"):
            build_source(_cfg("unused", "data.source=parquet", f"data.path={uri}").data).plan()
    finally:
        fs.rm(uri, recursive=True)


# ----------------------------------------------------------------------------- cache keys (no Ray)


def test_key_changes_with_a_file_the_resolution_and_the_encoder(tmp_path, tiny_vae_dir):
    root = _imagefolder(
        tmp_path / "src",
        [{"file_name": f"{i}.png", "text": f"digit {i}"} for i in range(3)],
        {f"{i}.png": _png(_digit_image(i, mode="RGB")) for i in range(3)},
    )

    def key(*overrides):
        cfg = _cfg(tmp_path, "data.source=imagefolder", f"data.path={root}", *overrides)
        return cache_spec(cfg, build_source(cfg.data)).key

    base = key()
    assert key() == base  # same inputs, same key
    assert key("data.resolution=24") != base
    assert key("text_encoder.max_length=8") != base
    assert key("data.channels=1") != base
    assert key(f"vae.path={tiny_vae_dir}") != base
    (root / "1.png").touch()  # small sets are hashed by content: a touch alone keeps the key
    assert key() == base
    (root / "1.png").write_bytes(_png(_digit_image(7, mode="RGB")))  # one input file changed
    changed = key()
    assert changed != base
    meta = (root / "metadata.jsonl").read_text()
    (root / "metadata.jsonl").write_text(meta.replace("digit 2", "digit two"))  # one caption changed
    assert key() != changed


def test_incomplete_folders_are_never_hits_and_are_cleaned(tmp_path):
    store = CacheStore(str(tmp_path / "cache"))
    key = "digits-r16-c1-0123456789abcdef"
    (tmp_path / "cache" / key / "data").mkdir(parents=True)
    (tmp_path / "cache" / key / "data" / "part.parquet").write_bytes(b"half written")
    (tmp_path / "cache" / f".tmp-{key}-crashed" / "data").mkdir(parents=True)
    assert store.read_manifest(key) is None  # no manifest: not a cache
    (tmp_path / "cache" / key / "manifest.json").write_text(json.dumps(
        {"format": "apexdistill-cache", "preprocess_version": 1, "complete": True, "files": [{"path": "data/part.parquet", "bytes": 999}]}
    ))
    assert store.read_manifest(key) is None  # a data file of the wrong size: not a cache either
    assert sorted(store.cleanup_incomplete(key)) == sorted([f".tmp-{key}-crashed", key])
    assert not any((tmp_path / "cache").iterdir())


# ----------------------------------------------------------------------------- Ray pipeline


def _kill_encoder_when_it_works(probe, before: int) -> threading.Thread:
    """SIGKILL the text-encoder actor's process (a child of this process's raylet, found by its process title)
    once it has been constructed (the probe counts constructions) and is encoding."""
    import psutil
    import ray

    def run() -> None:
        deadline = time.time() + RAY_TIMEOUT
        while time.time() < deadline:
            if sum(ray.get(probe.get.remote()).values()) > before:
                for proc in psutil.Process().children(recursive=True):
                    try:
                        if "TextEncodeStage" in " ".join(proc.cmdline()):
                            proc.send_signal(signal.SIGKILL)
                            killed.append(proc.pid)
                            return
                    except psutil.Error:
                        continue
            time.sleep(0.05)

    killed: list[int] = []
    thread = threading.Thread(target=run, daemon=True)
    thread.killed = killed  # type: ignore[attr-defined]
    thread.start()
    return thread


@pytest.mark.timeout(RAY_TIMEOUT)
def test_a_killed_encoder_actor_is_told_and_fails_clean_or_is_restarted(tmp_path, ray_local, capfd):
    """The encoder actor's process SIGKILLed mid-build. With data.actor_max_restarts=0 (the default) the console says
    which process died, the build raises a clear error and publishes nothing; with 1, Ray Data restarts the actor and
    the cache has every row once. Ray's own report goes to the log file."""
    from apexdistill.console import route_logs
    from apexdistill.data.digits import load_digits_split

    route_logs(tmp_path / "logs")
    for restarts in (0, 1):
        cfg = _cfg(tmp_path, "data.batch_size=32", f"data.actor_max_restarts={restarts}", f"data.cache_uri={tmp_path / f'c{restarts}'}")
        capfd.readouterr()
        killer = _kill_encoder_when_it_works(ray_local, _constructed(ray_local))
        if restarts == 0:
            with pytest.raises(PreprocessError, match="an encoder actor died and data.actor_max_restarts=0: the build published nothing"):
                run_preprocess(cfg)
            assert not list((tmp_path / "c0").rglob("manifest.json"))
        else:
            info = run_preprocess(cfg)
            split = load_digits_split("train", 16, cfg.data.test_fraction, cfg.data.split_seed)
            cached = load_cache_tensors(info.uri)
            assert info.rows == len(split.labels)
            assert sorted(cached["label"].tolist()) == sorted(split.labels.tolist())  # every row once
            torch.testing.assert_close(cached["x"].sum(), split.images.sum())
        killer.join(timeout=5)
        console = capfd.readouterr()
        assert killer.killed, "the build ended before its encoder was killed"
        then = "the build stops and publishes nothing" if restarts == 0 else "Ray Data restarts it and retries its rows"
        assert f"[preprocess] a worker of the build died: its process (pid {killer.killed[0]}) died (SYSTEM_ERROR" in console.out, console.out
        assert then in console.out and "A worker died" not in console.out + console.err
    assert "A worker died" in (tmp_path / "logs" / "apexdistill.log").read_text()


@pytest.mark.timeout(RAY_TIMEOUT)
def test_digits_cache_matches_direct_encoding_then_hits_and_survives_a_crashed_rebuild(tmp_path, ray_local, minilm_states):
    from apexdistill.data.digits import load_digits_split

    cfg = _cfg(tmp_path, "data.limit=40")
    before = _constructed(ray_local)
    cold = run_preprocess(cfg)
    assert not cold.hit and cold.rows == 40 and cold.rejected == 0 and cold.encoder_actors == 1
    assert _constructed(ray_local) == before + 1
    assert Path(cold.uri).parent == Path(tmp_path) / "cache" and Path(cold.uri, "rejects.parquet").is_file()

    cached = load_cache_tensors(cold.uri)
    split = load_digits_split("train", 16, cfg.data.test_fraction, cfg.data.split_seed)
    assert cached["x"].shape == (40, 1, 16, 16) and cached["x"].dtype == torch.float32
    torch.testing.assert_close(cached["x"], split.images[:40])  # the same pixels as the in-memory path
    assert torch.equal(cached["label"], split.labels[:40])
    states, masks = minilm_states  # direct TextEncoder.encode of the ten captions
    torch.testing.assert_close(cached["text"], states[cached["label"]], atol=1e-5, rtol=1e-5)
    assert torch.equal(cached["text_mask"], masks[cached["label"]]) and cached["text_mask"].dtype == torch.int64
    manifest_path = Path(cold.uri) / "manifest.json"
    manifest_bytes = manifest_path.read_bytes()
    manifest = json.loads(manifest_bytes)
    assert manifest["rows"] == 40 and manifest["columns"]["x"] == {"dtype": "float32", "shape": [1, 16, 16]}
    assert manifest["columns"]["text"]["shape"] == [16, 384] and manifest["encoders"]["text"]["identity"].endswith(":d384:L16")

    # same inputs again: a hit that constructs no encoder and leaves the manifest alone
    hit = run_preprocess(cfg)
    assert hit.hit and hit.uri == cold.uri and hit.rows == 40 and hit.encoder_actors == 0
    assert _constructed(ray_local) == before + 1
    assert manifest_path.read_bytes() == manifest_bytes

    # a forced rebuild that crashes in the writer step: the old cache stays complete, nothing half-written remains
    def crash(tmp_uri: str) -> None:
        assert list(Path(tmp_uri, "data").glob("*.parquet"))  # the data files were written ...
        raise RuntimeError("injected crash before the manifest")  # ... and the manifest never is

    with pytest.raises(RuntimeError, match="injected crash"):
        run_preprocess(cfg, force=True, on_written=crash)
    assert manifest_path.read_bytes() == manifest_bytes
    assert not [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
    assert run_preprocess(cfg).hit

    # the cache streams through Ray Data as training will read it (its few files listed in the driver, not
    # by Ray 2.60's pool of footer-reading actors; the caller's own DataContext is left as it was)
    import ray

    ctx = ray.data.DataContext.get_current()
    default = ctx.use_datasource_v2
    batch = next(iter(read_cache(cold.uri).iter_torch_batches(batch_size=8)))
    assert ctx.use_datasource_v2 == default
    assert batch["x"].shape == (8, 1, 16, 16) and batch["text"].shape == (8, 16, 384)
    # read into this process instead (a sweep trial training itself): the same in-memory rows, in order
    from apexdistill.data.preprocess import read_cache_tables
    from apexdistill.train.data import LocalRows, shard_batches

    train_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"in_memory_max_mb": 64})})
    via_ray = shard_batches(read_cache(cold.uri), train_cfg, cold.rows, 10, seed=0)
    local = shard_batches(LocalRows(read_cache_tables(cold.uri)), train_cfg, cold.rows, 10, seed=0)
    assert local.n == via_ray.n == cold.rows and sorted(local.rows) == sorted(via_ray.rows)
    for k in via_ray.rows:
        assert torch.equal(local.rows[k], via_ray.rows[k]), k
    # Ray Train workers take an equal, strided share each (3 ranks: the remainder row is dropped)
    shards = [shard_batches(LocalRows(read_cache_tables(cold.uri)).shard(r, 3), train_cfg, cold.rows // 3, 10, seed=0)
              for r in range(3)]
    keep = cold.rows // 3
    assert [b.n for b in shards] == [keep] * 3
    for r, b in enumerate(shards):
        for k in via_ray.rows:
            assert torch.equal(b.rows[k], local.rows[k][r::3][:keep]), (r, k)
    with pytest.raises(ValueError, match="rank 3 is not in a world of 3"):
        LocalRows([]).shard(3, 3)


@pytest.mark.timeout(RAY_TIMEOUT)
def test_parquet_source_with_vae_latents_match_direct_encoding(tmp_path, ray_local, tiny_vae_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from apexdistill.models.text import TextEncoder
    from apexdistill.models.vae import load_vae

    modes = ["RGB", "RGBA", "P", "I;16", "L", "RGB"]
    images = [_png(_digit_image(i, size=24 + 8 * (i % 2), mode=m)) for i, m in enumerate(modes)]
    images[-1] = _png(_digit_image(5, mode="RGB").resize((48, 24)))  # non-square: resize + centre crop
    long_caption = "a handwritten digit " + " ".join(["very"] * 40) + " five"
    captions = [f"a handwritten digit {w}" for w in ("zero", "one", "two", "three", "four")] + [long_caption]
    src = tmp_path / "src"
    src.mkdir()
    table = pa.table({"image": pa.array(images, pa.binary()), "text": captions, "label": list(range(6))})
    pq.write_table(table.slice(0, 4), src / "part-0.parquet", row_group_size=2)
    pq.write_table(table.slice(4), src / "part-1.parquet")

    cfg = _cfg(tmp_path, "data.source=parquet", f"data.path={src}", "data.channels=3", f"vae.path={tiny_vae_dir}", "data.batch_size=4")
    info = run_preprocess(cfg)
    assert info.rows == 6 and info.rejected == 0 and info.truncated == 1 and info.encoder_actors == 2
    assert info.manifest["truncated_captions"] == 1 and info.manifest["columns"]["x"]["shape"] == [4, 8, 8]
    cached = load_cache_tensors(info.uri)
    assert cached["row_id"] == [f"part-0.parquet#{i}" for i in range(4)] + [f"part-1.parquet#{i}" for i in range(2)]
    assert cached["label"].tolist() == list(range(6)) and cached["caption"] == captions

    pixels = torch.from_numpy(np.stack([decode_image_bytes(b, 3, 16) for b in images]))
    latents = load_vae(tiny_vae_dir).encode(pixels)
    torch.testing.assert_close(cached["x"], latents, atol=1e-5, rtol=1e-4)
    states, mask = TextEncoder(max_length=16).encode(captions)
    torch.testing.assert_close(cached["text"], states, atol=1e-5, rtol=1e-5)
    assert torch.equal(cached["text_mask"], mask)


@pytest.mark.timeout(RAY_TIMEOUT)
def test_bad_rows_are_rejected_with_reasons_and_the_threshold_fails_fast(tmp_path, ray_local):
    (tmp_path / "outside.png").write_bytes(_png(_digit_image(0)))
    good = {f"img/{i}.png": _png(_digit_image(i, mode="RGB" if i % 2 else "L")) for i in range(6)}
    rows = [{"file_name": name, "text": f"digit {i}", "label": i} for i, name in enumerate(good)]
    rows += [
        {"file_name": "corrupt.png", "text": "a corrupt file"},
        {"file_name": "missing.png", "text": "a missing file"},
        {"file_name": "img/0.png", "text": "   "},
        {"file_name": "../outside.png", "text": "escapes the root"},
        {"file_name": "/etc/hostname", "text": "absolute"},
    ]
    root = _imagefolder(tmp_path / "src", rows, {**good, "corrupt.png": b"\x89PNG\r\n\x1a\n\x00garbage"})
    cache = tmp_path / "cache"

    # default threshold (1%): fails before any encoder starts, names counts and the rejects file, publishes nothing
    strict = _cfg(tmp_path, "data.source=imagefolder", f"data.path={root}")
    before = _constructed(ray_local)
    with pytest.raises(PreprocessError) as failure:
        run_preprocess(strict)
    message = str(failure.value)
    assert "4 of 11 rows rejected" in message and "data.max_reject_fraction=0.01" in message and "nothing was published" in message
    failed_rejects = message.split("see the rejects table ")[1].split(";")[0]
    assert Path(failed_rejects).is_file() and "failed-" in failed_rejects
    assert _constructed(ray_local) == before
    assert not [p for p in cache.iterdir() if (p / "manifest.json").exists()]

    lenient = _cfg(tmp_path, "data.source=imagefolder", f"data.path={root}", "data.max_reject_fraction=0.5", "data.channels=3")
    info = run_preprocess(lenient)
    assert info.rows == 6 and info.rejected == 5
    reasons = _rejects(info.rejects_uri)
    assert reasons == {
        "corrupt.png": "undecodable", "missing.png": "missing_file", "img/0.png#1": "empty_caption",
        "../outside.png": "outside_root", "/etc/hostname": "outside_root",
    }
    assert info.manifest["reject_reasons"]["outside_root"] == 2
    cached = load_cache_tensors(info.uri)
    assert cached["row_id"] == sorted(good) and cached["label"].tolist() == list(range(6))
    assert cached["x"].shape == (6, 3, 16, 16)

    # actor settings that would starve the decode tasks on 2 CPUs are refused up front
    with pytest.raises(ValueError, match="data.text_actors"):
        run_preprocess(_cfg(tmp_path, "data.limit=8", "data.text_actors=2", "data.text_actor_cpus=1.0"))


@pytest.mark.timeout(RAY_TIMEOUT)
def test_memory_fsspec_source_and_cache_end_to_end(tmp_path, ray_local):
    import fsspec

    fs = fsspec.filesystem("memory")
    tag = uuid.uuid4().hex[:8]
    src, cache = f"memory://src-{tag}", f"memory://cache-{tag}"
    rows = [{"file_name": f"{i}.png", "text": f"a handwritten digit {i}", "label": i} for i in range(3)]
    rows.append({"file_name": "bad.png", "text": "broken"})
    for i in range(3):
        fs.pipe(f"{src}/{i}.png", _png(_digit_image(i)))
    fs.pipe(f"{src}/bad.png", b"not an image")
    fs.pipe(f"{src}/metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    try:
        args = ["data.source=imagefolder", f"data.path={src}", f"data.cache_uri={cache}", "data.channels=1"]
        # the corrupt file is only found while decoding: the late threshold check fails, nothing is published
        with pytest.raises(PreprocessError, match="1 of 4 rows rejected"):
            run_preprocess(_cfg(tmp_path, *args))
        assert not [p for p in fs.find(cache) if p.endswith("manifest.json")]

        cfg = _cfg(tmp_path, *args, "data.max_reject_fraction=0.3")
        key = cache_spec(cfg, build_source(cfg.data)).key
        fs.pipe(f"{cache}/.tmp-{key}-crashed/data/part.parquet", b"left by a crash")  # a crashed build's leftovers
        info = run_preprocess(cfg)
        assert info.uri.startswith("memory://") and info.rows == 3 and info.rejected == 1
        assert not fs.exists(f"{cache}/.tmp-{key}-crashed")
        assert _rejects(info.rejects_uri) == {"bad.png": "undecodable"}
        cached = load_cache_tensors(info.uri)
        assert cached["row_id"] == ["0.png", "1.png", "2.png"] and cached["x"].shape == (3, 1, 16, 16)
        expected = torch.from_numpy(np.stack([decode_image_bytes(_png(_digit_image(i)), 1, 16) for i in range(3)]))
        torch.testing.assert_close(cached["x"], expected)
        assert read_cache(info.uri).count() == 3
        assert run_preprocess(cfg).hit
        assert default_cache_uri(cfg) == cache
    finally:
        for path in (src, cache):
            if fs.exists(path):
                fs.rm(path, recursive=True)
