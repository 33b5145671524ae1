"""Embed load test: a large synthetic catalog on local disk through ``run_embed_items`` with the tiny model.

    python benchmarks/embed_load.py                       # 100_000 items (and a 10_000 run for the memory ratio)
    python benchmarks/embed_load.py --sizes 5000,50000    # any sizes; each runs in a fresh process

The catalog is written with pyarrow directly: ``--distinct-images`` small PNGs (default 48, ``--image-size``
px) shared by all items, and a distinct title per item, so building 100k rows takes about a second. Shared
images mean each distinct image is decoded and encoded once per fetch batch / actor cache: the figures measure
the pipeline's per-row cost (read, fetch, hash, title forward, Parquet write, manifest), not image forwards.

Each size runs in a fresh child process that starts its own local Ray and samples, every 0.25 s, the summed
PSS of the child (the driver) and all its descendants (GCS, raylet, workers: the whole process tree) and
their private memory (USS less the object store's pages mapped by one process only), via
``benchmarks/embed_pipeline.py``'s ``_session_pss``. It prints items/s (input rows / wall time of
``run_embed_items``, Ray start-up excluded, model actor start-up included), the peak tree PSS and private
memory, the driver's peak RSS and the ratio of the peaks between the largest and smallest size.

Measured 2026-11-23 on the shared 2-core box (see benchmarks/RESULTS.md): 100_000 items at 868-982 items/s;
driver RSS 1.03-1.05x from 10k to 100k, the tree's private memory 1.07-1.08x (~1.57 -> ~1.69 GiB), the model
actor flat (~390 MiB). Tree PSS grows 1.29x: the write task maps one output file's worth of blocks in the object
store (default rows_per_file ~277k rows of d=64), pages bounded by ``object_store_memory``, not by the catalog.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("VLM2REC_BUILD_DIR", str(REPO / "build"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_catalog(root: Path, n: int, distinct_images: int, image_size: int) -> Path:
    """``root/catalog.parquet`` with ``n`` rows over ``distinct_images`` PNGs in ``root/images/``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(distinct_images):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(buf, format="PNG")
        (root / "images" / f"{k:03d}.png").write_bytes(buf.getvalue())
    ids = pa.array([f"L{i:07d}" for i in range(n)])
    titles = pa.array([f"item {i} colour {i % 97} size {i % 13}" for i in range(n)])
    uris = pa.array([f"images/{i % distinct_images:03d}.png" for i in range(n)])
    path = root / "catalog.parquet"
    pq.write_table(pa.table({"item_id": ids, "title": titles, "image_uri": uris}), path)
    return path


def child(args: argparse.Namespace) -> dict:
    from embed_pipeline import model_dir, peak_memory

    from vlm2rec_ray.config import EmbedJobConfig, load_config
    from vlm2rec_ray.embed.pipeline import run_embed_items
    from vlm2rec_ray.runtime import init_local_ray

    cfg = load_config(EmbedJobConfig, None, [
        f"model.name={model_dir('tiny')}", "model_version=load", f"catalog_uri={args.catalog}",
        f"output_uri={args.out}", "dt=2026-01-01", "progress=false", f"batch_size={args.batch_size}",
        f"preprocess_batch_size={args.preprocess_batch_size}", "model.min_pixels=3136", "model.max_pixels=3136",
        *args.set])
    init_local_ray(num_cpus=os.cpu_count())
    with peak_memory(digits=None) as peaks:
        t0 = time.perf_counter()
        s = run_embed_items(cfg)
        wall = time.perf_counter() - t0
    return {"items": args.items, "ok": s["ok"], "failed": s["failed"], "wall_s": round(wall, 1),
            "items_per_s": round(s["input_rows"] / wall, 1), "tree_pss_mib": round(peaks["tree_pss_mib"], 1),
            "driver_rss_mib": round(peaks["driver_rss_mib"], 1), "by_process_at_peak": peaks["by_process_at_peak"],
            "tree_private_mib": round(peaks["tree_private_mib"], 1),
            "by_process_private_at_peak": peaks["by_process_private_at_peak"],
            "driver_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000", help="comma-separated catalog sizes (smallest first)")
    p.add_argument("--distinct-images", type=int, default=48)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--preprocess-batch-size", type=int, default=512)
    p.add_argument("--set", action="append", default=[], help="extra EmbedJobConfig override key=value, e.g. "
                   "rows_per_file=10000 (the writer buffers up to one output file: target_file_mib, 256 MiB)")
    p.add_argument("--workdir", default=None, help="where catalogs and outputs go (default: a temp dir)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--items", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--catalog", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in [int(x) for x in args.sizes.split(",")]:
            t0 = time.perf_counter()
            catalog = make_catalog(Path(tmp) / f"n{n}", n, args.distinct_images, args.image_size)
            built = time.perf_counter() - t0
            cmd = [sys.executable, __file__, "--child", "--items", str(n), "--catalog", str(catalog),
                   "--out", str(Path(tmp) / f"out{n}"), "--batch-size", str(args.batch_size),
                   "--preprocess-batch-size", str(args.preprocess_batch_size),
                   *[a for s in args.set for a in ("--set", s)]]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["catalog_build_s"] = round(built, 2)
            print(f"{n:>7} items: {row['items_per_s']} items/s ({row['wall_s']} s, ok {row['ok']}, failed "
                  f"{row['failed']}); peak PSS of the process tree {row['tree_pss_mib']:.0f} MiB, driver RSS peak "
                  f"{row['driver_rss_mib']:.0f} MiB; catalog built in {built:.2f} s\n         at the peak (MiB): "
                  + ", ".join(f"{k} {v}" for k, v in list(row["by_process_at_peak"].items())[:8])
                  + f"\n         private memory (USS less object-store pages) of the tree, peak {row['tree_private_mib']:.0f} "
                  "MiB; at its peak: "
                  + ", ".join(f"{k} {v}" for k, v in list(row["by_process_private_at_peak"].items())[:8]), flush=True)
            rows.append(row)
    if len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        print(f"memory flatness: tree PSS {hi['items']} / {lo['items']} items = "
              f"{hi['tree_pss_mib'] / lo['tree_pss_mib']:.2f}; tree private memory = "
              f"{hi['tree_private_mib'] / lo['tree_private_mib']:.2f}; "
              f"driver RSS = {hi['driver_rss_mib'] / lo['driver_rss_mib']:.2f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
