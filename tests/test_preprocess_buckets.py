"""Aspect-ratio buckets: real photos (scikit-image) of mixed shapes in an imagefolder land in their
nearest-aspect bucket in the real Ray Data cache (pixels and VAE latents); the real batch sampler
never mixes buckets and gives every rank the same bucket sequence. Training, resuming and sampling
on these buckets run in test_storage.py. (Named to sort after test_cluster.py: that file's CLI test
needs a process where Ray has not started yet.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apexdistill.config import ConfigError, build_config
from apexdistill.data.cache import cache_spec
from apexdistill.data.sources import build_source
from apexdistill.data.buckets import nearest_bucket, resolve_buckets, sana_buckets

BUCKETS = [[16, 16], [16, 32], [32, 16]]  # conftest's bucket_photos: (height, width) square, landscape 1:2, portrait 2:1


@pytest.fixture(scope="module")
def photo_folder(bucket_photos) -> Path:
    return bucket_photos.folder


def _cfg(workdir, folder, *overrides):
    return build_config({}, [f"run.workdir={workdir}", "data.source=imagefolder", f"data.path={folder}", "data.channels=3",
                             f"data.buckets={json.dumps(BUCKETS)}", *overrides])


@pytest.fixture(scope="module")
def photos(bucket_photos):
    return bucket_photos.photos


# ----------------------------------------------------------------------------- no Ray


def test_named_sana_set_and_size_checks(tmp_path, photo_folder):
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN

    # at a resolution diffusers has a table for, the table itself (its sides are multiples of 32 already)
    assert sana_buckets(1024, 32) == [(int(h), int(w)) for h, w in ASPECT_RATIO_1024_BIN.values()]
    assert sana_buckets(512, 32) == [(int(h), int(w)) for h, w in ASPECT_RATIO_512_BIN.values()]
    # elsewhere the 1024 table scaled, rounded to the step, duplicates once: the square bin is the resolution
    small = resolve_buckets(_cfg(tmp_path, photo_folder, "data.buckets=sana"))  # tiny Sana in pixels: step 4
    assert (16, 16) in small and len(set(small)) == len(small) and all(h % 4 == 0 and w % 4 == 0 for h, w in small)
    assert (8, 32) in small and (32, 8) in small  # the 1:4 and 4:1 bins

    with pytest.raises(ConfigError, match=r"data\.buckets\[1\] = \[16, 30\].*multiples of 4 \(the VAE factor 1 x the transformer's patch size 4\)"):
        _cfg(tmp_path, photo_folder, "data.buckets=[[16, 16], [16, 30]]")
    with pytest.raises(ConfigError, match=r"data\.buckets.*built-in digits"):
        build_config({}, ["data.buckets=sana"])
    with pytest.raises(ConfigError, match=r"data\.buckets\[1\].*listed twice"):
        _cfg(tmp_path, photo_folder, "data.buckets=[[16, 16], [16, 16]]")
    # without buckets the key hashes exactly what it did before buckets existed: existing caches still hit
    square = build_config({}, [f"run.workdir={tmp_path}", "data.source=imagefolder", f"data.path={photo_folder}", "data.channels=3"])
    spec = cache_spec(square, build_source(square.data))
    bucketed = cache_spec(_cfg(tmp_path, photo_folder), build_source(square.data))
    # (the key's hash part is hex and may itself start with "b": look for the bucket-count field, "-b<N>-")
    assert "buckets" not in spec.material and spec.buckets is None and not re.search(r"-b\d+-", spec.key)
    assert bucketed.key != spec.key and bucketed.material["buckets"] == BUCKETS and "-b3-" in bucketed.key
    assert nearest_bucket(100, 100, [tuple(b) for b in BUCKETS]) == 0
    assert nearest_bucket(50, 100, [tuple(b) for b in BUCKETS]) == 2  # width 50, height 100: portrait


# ----------------------------------------------------------------------------- Ray


@pytest.mark.timeout(240)
def test_photos_land_in_their_buckets_and_batches_never_mix(tmp_path, photo_folder, photos, bucket_photos):
    from apexdistill.data.preprocess import load_cache_tensors, prepare_image, read_cache, read_cache_tables, run_preprocess
    from apexdistill.train.data import BucketedInMemoryBatches, BucketedStreamingBatches, DataShapes, LocalRows, shard_batches
    from apexdistill.train.driver import ensure_ray

    ensure_ray()
    cfg = _cfg(tmp_path, photo_folder, "train.batch_size=4", f"data.cache_uri={bucket_photos.cache}")  # test_storage reuses it
    info = run_preprocess(cfg)
    assert info.rows == len(photos) and info.rejected == 0 and "-b3-" in info.key
    assert [b["rows"] for b in info.manifest["buckets"]] == [2, 2, 3]
    assert [b["x_shape"] for b in info.manifest["buckets"]] == [[3, 16, 16], [3, 16, 32], [3, 32, 16]]

    cached = load_cache_tensors(info.uri)
    by_file = dict(zip(cached["row_id"], zip(cached["bucket"].tolist(), cached["x"])))
    for file, photo, size, bucket in photos:
        got_bucket, x = by_file[file]
        assert got_bucket == bucket, file
        want = prepare_image(Image.open(photo_folder / file), 3, *BUCKETS[bucket])  # resize to cover, centre crop
        assert tuple(x.shape) == (3, *BUCKETS[bucket]) and torch.allclose(x, torch.from_numpy(want), atol=1e-6), file
    # an exactly 1:2 photo is only scaled (96x48 -> 32x16): no pixel of it is cropped away
    exact = np.asarray(Image.open(photo_folder / "coffee_wide.png").resize((32, 16), Image.Resampling.BICUBIC), np.float32) / 127.5 - 1
    assert torch.allclose(by_file["coffee_wide.png"][1], torch.from_numpy(exact.transpose(2, 0, 1)), atol=1e-6)

    # in a VAE's latent space: each bucket's rows encoded at that bucket's shape (one VAE call per shape)
    from diffusers import AutoencoderKL

    from apexdistill.models.vae import load_vae, tiny_vae_config

    torch.manual_seed(0)
    AutoencoderKL(**tiny_vae_config(3)).save_pretrained(str(tmp_path / "vae"))
    latent = run_preprocess(_cfg(tmp_path, photo_folder, f"vae.path={tmp_path / 'vae'}", "data.cache_uri=" + str(tmp_path / "cache")))
    assert [b["x_shape"] for b in latent.manifest["buckets"]] == [[4, 8, 8], [4, 8, 16], [4, 16, 8]]
    vae, encoded = load_vae(tmp_path / "vae"), load_cache_tensors(latent.uri)
    for row_id, bucket, x in zip(encoded["row_id"], encoded["bucket"].tolist(), encoded["x"]):
        pixels = torch.from_numpy(prepare_image(Image.open(photo_folder / row_id), 3, *BUCKETS[bucket]))[None]
        torch.testing.assert_close(x[None], vae.encode(pixels), atol=1e-5, rtol=1e-4)

    # the real batch sampler: one bucket per batch, the same bucket sequence on two ranks, proportions by rows
    shapes = DataShapes.from_manifest(info.manifest, info.uri)
    assert shapes.buckets == [[16, 16], [16, 32], [32, 16]] and shapes.resolution == 16
    ranks = [shard_batches(read_cache(info.uri), cfg, info.rows, 10, seed=100 * r, shapes=shapes) for r in range(2)]
    assert all(isinstance(b, BucketedInMemoryBatches) for b in ranks)
    seen = [[], []]
    for _ in range(300):
        for r, batches in enumerate(ranks):
            batch = batches.next(4)
            assert len(set(batch["bucket"].tolist())) == 1  # never mixed
            b = int(batch["bucket"][0])
            assert tuple(batch["x"].shape) == (4, 3, *BUCKETS[b]) and batch["text"].shape[0] == 4
            seen[r].append(b)
    assert seen[0] == seen[1]  # ranks agree on every step's bucket
    share = np.bincount(seen[0], minlength=3) / 300
    assert np.allclose(share, [2 / 7, 2 / 7, 3 / 7], atol=0.08), share
    ranks[0].resume_at(10)
    assert ranks[0].schedule.bucket(ranks[0].draw) == seen[1][10]  # a resumed run continues the sequence
    # a sweep trial that trains in its own process reads the tables itself (LocalRows): the same rows
    local = shard_batches(LocalRows(read_cache_tables(info.uri)), cfg, info.rows, 10, seed=0, shapes=shapes)
    via_ray = shard_batches(read_cache(info.uri), cfg, info.rows, 10, seed=0, shapes=shapes)
    assert isinstance(local, BucketedInMemoryBatches) and sorted(local.by_bucket) == sorted(via_ray.by_bucket) == [0, 1, 2]
    for b in range(3):
        for k in via_ray.by_bucket[b]:
            assert torch.equal(local.by_bucket[b][k], via_ray.by_bucket[b][k]), (b, k)

    # the streaming sampler (shard larger than data.in_memory_max_mb) keeps buckets apart as well
    stream = shard_batches(read_cache(info.uri), cfg.model_copy(update={"data": cfg.data.model_copy(update={"in_memory_max_mb": 0})}),
                           info.rows, 10, seed=0, shapes=shapes)
    assert isinstance(stream, BucketedStreamingBatches)
    for _ in range(6):
        batch = stream.next(4)
        assert len(set(batch["bucket"].tolist())) == 1 and tuple(batch["x"].shape[2:]) == tuple(BUCKETS[int(batch["bucket"][0])])
    stream.close()
    # training and sampling on these buckets: test_storage.py (through S3, resumed and restarted)


def _weights_on_rank(rank: int, init: str, counts: list[list[int]], out: str) -> None:
    import torch.distributed as dist

    from apexdistill.train.data import bucket_weights

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=len(counts))
    try:
        Path(out, f"{rank}.json").write_text(json.dumps(bucket_weights(counts[rank])))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_ranks_agree_on_bucket_weights_and_leave_out_a_bucket_one_rank_lacks(tmp_path):
    """Two real gloo ranks: rank 1's shard has no row of bucket 1, so both leave it out; the weights
    are the rows summed over ranks."""
    import torch.multiprocessing as mp

    counts = [[3, 2, 0, 5], [4, 0, 0, 1]]
    mp.spawn(_weights_on_rank, args=(f"file://{tmp_path / 'rendezvous'}", counts, str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1] == [[7, 0, 0, 6], [1]]
