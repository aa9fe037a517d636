"""Shared fixtures. Ray-using tests get one local Ray instance per session (start-up costs seconds)."""

from __future__ import annotations

import os
import secrets

import pytest
import torch

# Two cores shared with Ray's worker processes: one torch thread per process avoids the
# oversubscription that makes small CPU kernels tens of times slower.
torch.set_num_threads(1)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's controller polls its workers every 2 s; the suite's fits are seconds long, so each spent
# about 6 s waiting on that poll (a 2-step 2-worker fit: 20 s -> 13 s). Inherited by every Ray process.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Ray 2.60 turns token authentication on for local clusters; one token for every cluster of the session
# (ray.init's and the `ray start --head` of test_cluster), set before anything reads Ray's config: the
# auth mode is read once per process.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
# The object-storage tests (test_storage.py) talk to a moto S3 server on 127.0.0.1. Ray's workers see
# the environment Ray started with, so the (dummy) credentials are set here, before any test starts
# Ray; the server's port is only known later and travels in run.storage_endpoint.
for _key, _value in (("AWS_ACCESS_KEY_ID", "apexdistill-test"), ("AWS_SECRET_ACCESS_KEY", "apexdistill-test"),
                     ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_REGION", "us-east-1"), ("AWS_EC2_METADATA_DISABLED", "true")):
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (a test elsewhere may have changed the count): on a
    shared 2-core machine extra threads only fight each other."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def minilm_states():
    """The ten digit captions encoded once with the real MiniLM: (10, L, 384) states and masks."""
    from apexdistill.data.digits import CAPTIONS
    from apexdistill.models.text import TextEncoder

    return TextEncoder(max_length=16).encode(CAPTIONS)


# fm from a random init (fast, and a bad learning rate is really bad), tiny evaluation
SWEEP_BASE = ["objective.name=fm", "train.batch_size=16", "train.log_every=5", "train.checkpoint_every=0",
              "eval.samples_per_class=5", "eval.during_samples_per_class=5", "eval.nfe=[1]", "tracking.experiment=sweeps-test"]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache folder for the session's digits runs (test_train, test_distributed, the sweeps): the
    first run preprocesses the digits into it (Ray Data with a text-encoder actor, ~15 s), the rest
    hit it. The preprocessing tests build their own caches."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def sweep_workdir(tmp_path_factory, shared_cache):
    """One work directory for the sweep and dashboard tests: the evaluator's classifier and the MLflow
    store are built once; every sweep has its own name, parent run and trials. Its ``cache`` (the
    default ``data.cache_uri``, also for the sweeps the tests run as a command) is ``shared_cache``."""
    import os

    workdir = tmp_path_factory.mktemp("sweeps")
    os.symlink(shared_cache, workdir / "cache")
    return workdir


@pytest.fixture(scope="session")
def grid_sweep(sweep_workdir, tmp_path_factory):
    """A real 2 x 2 grid sweep (train.lr x train.warmup_steps, plus a joint key with one point) on local
    Ray Tune, logged to the SQLite store of ``sweep_workdir`` in the experiment 'sweeps-grid':
    (cfg, result rows, parent run id).

    test_sweep and test_dashboard both use it, and under pytest-xdist they may run in different workers
    (processes): the sweep runs once a session, in the worker that asks first. That worker takes a copy of
    the store right after the sweep (SQLite's online backup, consistent while its later sweeps write to the
    original); a worker that asks later gets that copy as its work directory, so nothing it reads is being
    written by the other. The artifacts stay where the sweep wrote them (the store names them by path)."""
    import json
    import os
    import sqlite3
    from contextlib import closing
    from dataclasses import asdict
    from pathlib import Path

    from filelock import FileLock

    from apexdistill.tune.runner import TrialRow

    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # one process: nothing to share
        return _run_grid_sweep(sweep_workdir, tmp_path_factory)
    shared = tmp_path_factory.getbasetemp().parent / "grid-sweep"  # the session's folder, above every worker's
    record = shared / "sweep.json"
    with FileLock(str(shared) + ".lock"):
        if record.is_file():
            data = json.loads(record.read_text())
            return _grid_sweep_config(shared), [TrialRow(**row) for row in data["rows"]], data["parent"]
        cfg, rows, parent = _run_grid_sweep(sweep_workdir, tmp_path_factory)
        shared.mkdir()
        with closing(sqlite3.connect(Path(sweep_workdir).resolve() / "mlflow.db")) as src, \
                closing(sqlite3.connect(shared / "mlflow.db")) as dst:
            src.backup(dst)
        record.write_text(json.dumps({"rows": [asdict(row) for row in rows], "parent": parent}))
        return cfg, rows, parent


def _grid_sweep_config(workdir):
    from apexdistill.config import build_config

    return build_config({}, [f"run.workdir={workdir}", *SWEEP_BASE])


def _run_grid_sweep(sweep_workdir, tmp_path_factory):
    import json
    from pathlib import Path

    import yaml

    from apexdistill.tune.runner import run_sweep
    from apexdistill.tune.sweep import load_sweep

    cfg = _grid_sweep_config(sweep_workdir)
    path = tmp_path_factory.mktemp("grid-sweep-file") / "grid.yaml"
    # its own experiment (the base config's is sweeps-test): parent and trials must both land there
    path.write_text(yaml.safe_dump({"name": "grid", "experiment": "sweeps-grid", "budget": {"steps": 6}, "space": {
        "train.lr": {"grid": [1e-4, 3e-3]}, "train.warmup_steps": {"grid": [0, 2]},
        "train.grad_clip,train.weight_decay": {"grid": [[0.5, 0.0]]}},
        "max_concurrent": 2, "resources": {"workers": 0, "cpus_per_worker": 0.45}}, sort_keys=False))
    rows = run_sweep(cfg, load_sweep(path, cfg.model_dump(mode="json")), path.read_text())
    parent = json.loads((Path(sweep_workdir).resolve() / "sweeps" / "grid" / "parent_run.json").read_text())["run_id"]
    return cfg, rows, parent


# Aspect-ratio buckets (test_preprocess_buckets.py, test_storage.py): real photos cut to mixed shapes. Each entry:
# (file, scikit-image photo, (width, height) it is cut to, the bucket of BUCKET_SHAPES it belongs in)
BUCKET_SHAPES = [[16, 16], [16, 32], [32, 16]]  # (height, width): square, landscape 1:2, portrait 2:1
BUCKET_PHOTOS = [
    ("astronaut.png", "astronaut", (60, 60), 0),
    ("coffee_wide.png", "coffee", (96, 48), 1),  # exactly 1:2: scaled by 1/3 to 32x16, no crop
    ("chelsea_wide.png", "chelsea", (90, 50), 1),  # h/w 0.56: nearer 0.5 than 1
    ("rocket_near_square.png", "rocket", (80, 62), 0),  # h/w 0.78: nearer 1 than 0.5 in log ratio
    ("camera_tall.png", "camera", (30, 70), 2),
    ("cat_tall.jpg", "cat", (40, 80), 2),
    ("coffee_tall.png", "coffee", (45, 100), 2),
]


@pytest.fixture(scope="session")
def bucket_photos(tmp_path_factory):
    """An imagefolder of the photos above (metadata.jsonl) and one cache folder for the session:
    SimpleNamespace(folder, photos, buckets, cache, overrides)."""
    import json
    from types import SimpleNamespace

    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    rows = []
    for i, (file, photo, (w, h), _) in enumerate(BUCKET_PHOTOS):
        img = Image.fromarray(getattr(skimage.data, photo)()).convert("RGB")
        scale = min(img.width / w, img.height / h)  # the photo's centre region of that aspect ratio, resized to it
        cw, ch = int(w * scale), int(h * scale)
        left, top = (img.width - cw) // 2, (img.height - ch) // 2
        img.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BILINEAR).save(root / file)
        rows.append({"file_name": file, "text": f"a photo of {photo}", "label": i})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path_factory.mktemp("photo-cache")
    overrides = ["data.source=imagefolder", f"data.path={root}", "data.channels=3", f"data.buckets={json.dumps(BUCKET_SHAPES)}",
                 f"data.cache_uri={cache}"]
    return SimpleNamespace(folder=root, photos=BUCKET_PHOTOS, buckets=BUCKET_SHAPES, cache=cache, overrides=overrides)
