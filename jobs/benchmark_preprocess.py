"""Benchmark: the Ray Data preprocessing pipeline against a plain single-process loop, and cache hit
against cold build.

Both sides use the same source rows (an imagefolder of PNGs made from the real scikit-learn digits,
coloured and upscaled, with varied captions), the same decode/resize code, the same encoders and the
same Parquet output; both times include loading the encoders. The Ray side runs ``run_preprocess``
with ``--force`` (a cold build) on an already started local Ray; the hit side runs it again without.
Prints medians and ratios (targets: Ray >= 1.3x the loop's rows/s on 2 cores; hit < 10% of cold),
writes ``<workdir>/benchmarks/preprocess.json`` and logs to MLflow (SQLite in the work directory,
experiment "benchmarks").

    python jobs/benchmark_preprocess.py --rows 8192 --repeats 3
    python jobs/benchmark_preprocess.py --rows 64 --repeats 1      # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
INKS = ["black", "blue", "red", "green", "purple", "brown", "grey", "orange"]
PAPERS = ["white", "cream", "yellow", "light blue", "pale green", "beige"]
STYLES = ["neat", "hasty", "bold", "thin", "slanted", "shaky", "careful", "large", "small", "smudged"]


def make_imagefolder(root: Path, rows: int, size: int, seed: int = 0) -> Path:
    """``rows`` PNGs from the real digits (cycled), coloured ink on coloured paper with a little
    noise (so PNGs do not compress to nothing), and a caption per row with many distinct values."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if (root / "metadata.jsonl").is_file() and sum(1 for _ in open(root / "metadata.jsonl")) == rows:
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    colours = {"black": (20, 20, 20), "blue": (30, 60, 200), "red": (200, 30, 30), "green": (30, 150, 50), "purple": (120, 40, 160),
               "brown": (120, 70, 30), "grey": (110, 110, 110), "orange": (230, 120, 20), "white": (250, 250, 250), "cream": (250, 245, 220),
               "yellow": (250, 240, 150), "light blue": (200, 225, 250), "pale green": (210, 240, 210), "beige": (235, 225, 200)}
    lines = []
    for i in range(rows):
        k = i % len(digits.target)
        ink, paper, style = INKS[rng.integers(len(INKS))], PAPERS[rng.integers(len(PAPERS))], STYLES[rng.integers(len(STYLES))]
        alpha = np.asarray(Image.fromarray((digits.images[k] / 16 * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
        img = (1 - alpha[..., None]) * np.array(colours[paper]) + alpha[..., None] * np.array(colours[ink])
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        name = f"img/{i:06d}.png"
        (root / "img").mkdir(exist_ok=True)
        Image.fromarray(img, "RGB").save(root / name)
        caption = f"a {style} handwritten digit {WORDS[int(digits.target[k])]} in {ink} ink on {paper} paper"
        lines.append(json.dumps({"file_name": name, "text": caption, "label": int(digits.target[k])}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def single_process(cfg, out_dir: Path) -> dict[str, float]:
    """The same work without Ray: one process, batches in a loop, one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from apexdistill.data.preprocess import decode_image_bytes, encode_text
    from apexdistill.data.sources import build_source
    from apexdistill.models.text import TextEncoder
    from apexdistill.models.vae import build_vae

    t0 = time.perf_counter()
    parts = {"load": 0.0, "decode": 0.0, "text": 0.0, "vae": 0.0, "write": 0.0}
    plan = build_source(cfg.data).plan()
    encoder = TextEncoder(cfg.text_encoder.path if cfg.text_encoder.kind == "transformers" else None, cfg.text_encoder.max_length)
    vae = build_vae(cfg.vae, cfg.data.image_channels) if cfg.vae.path else None
    parts["load"] = time.perf_counter() - t0
    xs, texts, masks, captions, labels, ids = [], [], [], [], [], []
    bs = cfg.data.batch_size
    for i in range(0, len(plan.rows), bs):
        rows = plan.rows[i : i + bs]
        t = time.perf_counter()
        x = np.stack([decode_image_bytes(plan.fs.cat_file(r["path"]), cfg.data.image_channels, cfg.data.resolution) for r in rows])
        parts["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        states, mask, _ = encode_text(encoder, [r["caption"] for r in rows])
        parts["text"] += time.perf_counter() - t
        if vae is not None:
            t = time.perf_counter()
            x = vae.encode(torch.from_numpy(x)).numpy()
            parts["vae"] += time.perf_counter() - t
        xs.append(x), texts.append(states), masks.append(mask)
        captions += [r["caption"] for r in rows]
        labels += [r["label"] for r in rows]
        ids += [r["row_id"] for r in rows]
    t = time.perf_counter()
    x, text, mask = np.concatenate(xs), np.concatenate(texts), np.concatenate(masks)

    def fixed(a: np.ndarray) -> pa.Array:  # fixed-shape tensors as nested fixed-size lists
        arr = pa.array(a.reshape(-1))
        for dim in reversed(a.shape[1:]):
            arr = pa.FixedSizeListArray.from_arrays(arr, dim)
        return arr

    table = pa.table({"x": fixed(x), "text": fixed(text), "text_mask": fixed(mask), "caption": captions, "label": labels, "row_id": ids})
    pq.write_table(table, out_dir / "part-0.parquet")
    parts["write"] = time.perf_counter() - t
    parts["total"] = time.perf_counter() - t0
    parts["rows"] = len(ids)
    return parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8192, help="rows in the generated imagefolder")
    p.add_argument("--image-size", type=int, default=128, help="side of the generated PNGs (decoded, then resized to data.resolution)")
    p.add_argument("--repeats", type=int, default=3, help="cold runs per side (medians are reported)")
    p.add_argument("--hit-repeats", type=int, default=5)
    p.add_argument("--text-actors", type=int, default=2)
    p.add_argument("--vae", action="store_true", help="also encode latents with a tiny AutoencoderKL (saved under the work dir)")
    p.add_argument("--workdir", default="./apex-runs")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    p.add_argument("overrides", nargs="*", help="more config overrides, e.g. data.batch_size=128")
    args = p.parse_args()

    import ray
    import torch

    from apexdistill.config import build_config, flatten
    from apexdistill.data.preprocess import run_preprocess

    workdir = Path(args.workdir).resolve()
    bench = workdir / "benchmarks"
    src = make_imagefolder(bench / f"preprocess-src-{args.rows}-{args.image_size}", args.rows, args.image_size)
    overrides = ["data.source=imagefolder", f"data.path={src}", "data.channels=3", f"data.cache_uri={bench / 'preprocess-cache'}",
                 f"data.text_actors={args.text_actors}", f"run.workdir={workdir}"]
    if args.vae:
        from diffusers import AutoencoderKL

        from apexdistill.models.vae import tiny_vae_config

        vae_dir = bench / "tiny-vae-rgb"
        if not (vae_dir / "config.json").is_file():
            torch.manual_seed(0)
            AutoencoderKL(**tiny_vae_config(3)).save_pretrained(str(vae_dir))
        overrides += [f"vae.path={vae_dir}", "data.decode_cpus=0.5"]
    cfg = build_config({}, [*overrides, *args.overrides])

    loop_runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            loop_runs.append(single_process(cfg, Path(out)))
    print(f"[bench] single process ({torch.get_num_threads()} torch threads): " + ", ".join(f"{k} {v:.2f}" for k, v in loop_runs[-1].items()), flush=True)

    ray.init(num_cpus=args.num_cpus, include_dashboard=False)  # a running cluster: start-up is not part of a build
    cold, hit = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        info = run_preprocess(cfg, force=True)
        cold.append(time.perf_counter() - t)
    for _ in range(args.hit_repeats):
        t = time.perf_counter()
        again = run_preprocess(cfg)
        hit.append(time.perf_counter() - t)
        assert again.hit
    ray.shutdown()

    rows = info.rows
    loop_s = statistics.median(r["total"] for r in loop_runs)
    ray_s, hit_s = statistics.median(cold), statistics.median(hit)
    result = {
        "rows": rows, "image_size": args.image_size, "text_actors": args.text_actors, "vae": args.vae,
        "cpus": args.num_cpus or os.cpu_count(), "loop_torch_threads": torch.get_num_threads(),
        "loop_seconds": loop_s, "ray_seconds": ray_s, "hit_seconds": hit_s,
        "loop_rows_per_s": rows / loop_s, "ray_rows_per_s": rows / ray_s,
        "speedup": loop_s / ray_s, "hit_over_cold": hit_s / ray_s,
        "loop_parts_seconds": {k: statistics.median(r[k] for r in loop_runs) for k in ("load", "decode", "text", "vae", "write")},
        "loop_runs": [r["total"] for r in loop_runs], "ray_runs": cold, "hit_runs": hit,
    }
    print(
        f"[bench] {rows} rows: single process {result['loop_rows_per_s']:.0f} rows/s (median {loop_s:.2f} s), "
        f"Ray Data {result['ray_rows_per_s']:.0f} rows/s (median {ray_s:.2f} s) -> {result['speedup']:.2f}x (target >= 1.3x)"
    )
    print(f"[bench] cache hit {hit_s * 1000:.0f} ms vs cold {ray_s:.2f} s -> {100 * result['hit_over_cold']:.2f}% of cold (target < 10%)")
    from apexdistill.tracking import record_benchmark

    record_benchmark(
        workdir, "preprocess", result,
        params={**{k: v for k, v in flatten(cfg).items() if k.startswith(("data.", "text_encoder.", "vae."))},
                "bench.rows": rows, "bench.image_size": args.image_size, "bench.repeats": args.repeats, "bench.cpus": result["cpus"]},
        metrics={k: result[k] for k in ("loop_seconds", "ray_seconds", "hit_seconds", "loop_rows_per_s", "ray_rows_per_s", "speedup", "hit_over_cold")},
    )


if __name__ == "__main__":
    main()
