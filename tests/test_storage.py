"""Checkpoints and run folders on object storage (run.storage_uri) against a real S3 API: moto's
server on 127.0.0.1, started and stopped here. Atomic publishing (a publish that dies before its
manifest leaves the previous checkpoint complete), then real Ray Train runs: train, resume from
the S3 checkpoint, survive an injected worker failure, and export straight from the bucket."""

from __future__ import annotations

import json
import logging
import posixpath
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from apexdistill.config import ConfigError, build_config
from apexdistill.train.storage import MANIFEST, RunStorage, fetch_run, publish_remote

BUCKET = "apex-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (a free port) with one bucket: yields its endpoint URL."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(BUCKET)
        yield endpoint
    finally:
        server.stop()


def _write(step: int, tag: float):
    def write(folder: Path) -> None:
        save_file({"w": torch.full((64, 64), tag)}, str(folder / "model.safetensors"))
        (folder / "sharded").mkdir()
        (folder / "sharded" / "__0_0.distcp").write_bytes(b"shard" * 100)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    return write


def test_publish_is_atomic_and_a_dead_publish_leaves_the_last_checkpoint(s3, tmp_path):
    storage = RunStorage(f"s3://{BUCKET}/atomic", "run", s3)
    assert storage.latest() is None
    uri = publish_remote(storage, 2, _write(2, 2.0), keep=2, rank=0)
    assert uri == f"s3://{BUCKET}/atomic/runs/run/checkpoints/step_00000002"
    assert storage.latest() == storage.step_path(2)
    manifest = storage.read_manifest(storage.step_path(2))
    assert manifest["step"] == 2 and set(manifest["files"]) == {"model.safetensors", "sharded/__0_0.distcp", "trainer_state.json"}

    def crash(folder_uri: str) -> None:
        raise RuntimeError("injected crash after the uploads, before the manifest")

    with pytest.raises(RuntimeError, match="injected crash"):
        publish_remote(storage, 4, _write(4, 4.0), keep=2, rank=0, before_commit=crash)
    assert storage.step_folders() == [storage.step_path(2), storage.step_path(4)]  # step 4's files are there ...
    assert storage.read_manifest(storage.step_path(4)) is None  # ... but it is not a checkpoint
    assert storage.latest() == storage.step_path(2)
    local = storage.fetch(storage.latest(), tmp_path / "got")
    assert torch.equal(load_file(str(local / "model.safetensors"))["w"], torch.full((64, 64), 2.0))  # intact

    # a file that changed size after the manifest: not complete either
    storage.put_bytes("checkpoints/step_00000002/sharded/__0_0.distcp", b"truncated")
    assert storage.read_manifest(storage.step_path(2)) is None
    storage.put_bytes("checkpoints/step_00000002/sharded/__0_0.distcp", b"shard" * 100)

    # the next publishes remove the dead one, and prune beyond keep (manifest first)
    publish_remote(storage, 6, _write(6, 6.0), keep=2, rank=0)
    publish_remote(storage, 8, _write(8, 8.0), keep=2, rank=0)
    assert storage.step_folders() == [storage.step_path(6), storage.step_path(8)]

    # a bucket that does not exist: refused before Ray or any worker starts, naming the field; nothing written
    from apexdistill.train.driver import run_training

    bad = build_config({}, [f"run.workdir={tmp_path / 'w'}", "run.storage_uri=s3://no-such-bucket/x", f"run.storage_endpoint={s3}",
                            "tracking.enabled=false"])
    with pytest.raises(ValueError, match=r"run.storage_uri='s3://no-such-bucket/x': cannot write .*config.yaml"):
        run_training(bad)
    assert not (tmp_path / "w").exists()

    with pytest.raises(ConfigError, match="run.storage_uri='bucket/x' must be a URI"):
        build_config({}, ["run.storage_uri=bucket/x"])
    with pytest.raises(ConfigError, match="run.storage_endpoint .* needs run.storage_uri=s3://"):
        build_config({}, ["run.storage_uri=gs://b/x", "run.storage_endpoint=http://127.0.0.1:9"])


# two CPUs: fractional workers; fm from a random init, tiny batches
COMMON = ["train.strategy=ddp", "train.num_workers=1", "train.cpus_per_worker=0.45", "train.batch_size=4", "train.log_every=1",
          "objective.name=fm", "train.lr=1e-3", "tracking.enabled=false", "eval.at_end=false"]


@pytest.mark.timeout(300)
def test_train_resume_failure_and_export_through_s3(s3, tmp_path, monkeypatch, bucket_photos):
    """On the aspect-ratio buckets of conftest's photos (every batch one bucket, the bucket sequence
    seeded): 3 steps on S3, then the same run to 6 with a worker failure injected at step 5
    (checkpoint at 4). It resumes at 3 from the bucket, restarts from the step-4 checkpoint there,
    and ends equal (bit for bit) to 6 uninterrupted local steps, so the weights, the RNG streams and
    the bucket schedule all continue. Nothing of the checkpoints lands in run.workdir."""
    from apexdistill.cli import main
    from apexdistill.train.driver import run_training

    remote = [f"run.storage_uri=s3://{BUCKET}/runs-test", f"run.storage_endpoint={s3}"]

    def cfg(workdir, *extra):
        return build_config({}, [f"run.workdir={workdir}", *bucket_photos.overrides, "run.name=s3run", *COMMON, *extra])

    started = time.time()
    first = run_training(cfg(tmp_path / "w", *remote, "train.steps=3", "train.checkpoint_every=0"))
    first_s = time.time() - started
    storage = RunStorage(f"s3://{BUCKET}/runs-test", "s3run", s3)
    assert first.checkpoint_dir is None and first.checkpoint_uri == storage.to_uri(storage.step_path(3))
    assert not (first.run_dir / "checkpoints").exists()
    sizes = storage.read_manifest(storage.step_path(3))["files"]
    assert {"model.safetensors", "ema.safetensors", "rng_rank0.safetensors", "trainer_state.json"} <= set(sizes)
    assert storage.get_file("config.yaml", tmp_path / "c.yaml") and storage.get_file("data_shapes.json", tmp_path / "s.json")

    started = time.time()
    # a fresh work directory: the run folder's checkpoints come from the bucket alone
    second = run_training(cfg(tmp_path / "w2", *remote, "train.steps=6", "train.checkpoint_every=4", "train.fail_at_step=5",
                              "train.max_failures=1"))
    second_s = time.time() - started
    assert (second.run_dir / ".injected_failure").is_file() and second.metrics["step"] == 6
    assert storage.latest() == storage.step_path(6)
    assert [posixpath.basename(f) for f in storage.step_folders()] == ["step_00000004", "step_00000006"]  # num_to_keep=2

    # the reference: 6 uninterrupted steps in local mode (one process, no worker group to start)
    straight = run_training(cfg(tmp_path / "local", "train.steps=6", "train.checkpoint_every=0", "train.strategy=none",
                                "train.num_workers=0"))
    local = fetch_run(storage.run_uri, tmp_path / "fetched", endpoint=s3)
    got = load_file(str(local / "checkpoints" / "step_00000006" / "model.safetensors"))
    want = load_file(str(straight.checkpoint_dir / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert json.loads((local / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())["step"] == 6
    assert not (local / "checkpoints" / "step_00000006" / "rng_rank0.safetensors").exists()  # weights only

    # export reads the run straight from the bucket (endpoint from the standard AWS_ENDPOINT_URL)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    out = tmp_path / "export"
    assert main(["export", storage.run_uri, "-o", str(out)]) == 0
    exported = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    ema = load_file(str(local / "checkpoints" / "step_00000006" / "ema.safetensors"))
    assert all(torch.equal(exported[k], ema["transformer." + k]) for k in exported)
    # sampling reads it from the bucket too, at a bucket's shape (and refuses one the patching cannot take)
    from apexdistill.cli import sample_run
    from apexdistill.train.export import load_trained_backbone

    model, run_cfg = load_trained_backbone(storage.run_uri)
    images = sample_run(model, run_cfg, ["a photo of coffee"], 2, 1, seed=0, height=16, width=32)
    assert images.shape == (2, 3, 16, 32) and images.abs().max() <= 1
    png = tmp_path / "tall.png"
    assert main(["sample", storage.run_uri, "--prompt", "a photo of cat", "--num", "1", "--height", "32", "--width", "16", "-o", str(png)]) == 0
    assert png.is_file()
    assert main(["sample", storage.run_uri, "--prompt", "x", "--height", "16", "--width", "30", "-o", str(png)]) == 2
    print(f"[s3] first fit (3 steps) {first_s:.1f} s, resumed fit (3->6, one failure) {second_s:.1f} s; step_00000003 files: "
          + ", ".join(f"{k} {v} B" for k, v in sorted(sizes.items())))
