"""Embed pipeline benchmark: items/s of the whole run (S3 -> Parquet) vs the model's own forward throughput.

    python benchmarks/embed_pipeline.py                         # 3000 items on a moto S3 server, tiny model
    python benchmarks/embed_pipeline.py --items 5000 --storage local
    python benchmarks/embed_pipeline.py --memory 2000,20000     # peak memory as the catalog grows

Throughput mode builds a catalog of distinct titles and distinct random JPEGs (so no dedup flatters the
pipeline), uploads it to a moto S3 server on loopback (real HTTP; or a local dir with ``--storage local``),
runs ``run_embed_items`` (read, fetch, decode, model actor, Parquet write, manifest) and prints its items/s.
It then decodes the same images in this process and times the encoder alone (``encode_items`` on batches of
the same size, same torch thread count as the actor) and prints the ratio pipeline / model (target >= 0.85).

Memory mode runs each catalog size in a fresh process and samples, every 0.25 s, the driver's RSS and the
summed PSS of every process of the Ray instance (driver, GCS, raylet, workers; not the moto server), and
prints the peaks and their ratio between the largest and smallest size (target <= 1.2).

On the 2-core CI box the model actor holds one core; fetch/decode tasks, Ray's own processes, the Parquet
writer and the moto server share the other, so the ratio there measures that box as much as the pipeline.
"""

from __future__ import annotations

import argparse
import functools
import json
import operator
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("VLM2REC_BUILD_DIR", str(REPO / "build"))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("red green blue black white amber teal olive coral ivory mug lamp shirt chair table book toy bag hat "
         "watch vase clock kettle scarf").split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def make_catalog(base: str, n: int, image_size: int, endpoint: str | None, seed: int = 0) -> str:
    """Distinct titles and distinct random JPEGs (+-25% size jitter); returns the catalog URI."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from vlm2rec_ray import storage
    from vlm2rec_ray.data.images import encode_image

    rng = np.random.default_rng(seed)
    sizes = rng.integers(int(image_size * 0.75), int(image_size * 1.25) + 1, size=(n, 2))

    def put(i: int) -> None:
        r = np.random.default_rng(seed * 1_000_003 + i)
        im = Image.fromarray(r.integers(0, 255, (int(sizes[i, 0]), int(sizes[i, 1]), 3), dtype=np.uint8))
        storage.write_bytes(storage.join(base, f"images/{i:06d}.jpg"), encode_image(im, "JPEG"), endpoint=endpoint)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(n)))
    titles = [" ".join(rng.choice(WORDS, 3)) + f" no. {i}" for i in range(n)]
    table = pa.table({"item_id": [f"item{i:06d}" for i in range(n)], "title": titles,
                      "image_uri": [f"images/{i:06d}.jpg" for i in range(n)]})
    uri = storage.join(base, "catalog.parquet")
    storage.write_parquet(table, uri, endpoint=endpoint)
    return uri


def model_dir() -> str:
    from vlm2rec_ray.model.tiny import build_tiny_backbone

    d = REPO / "build" / "bench" / "tiny_backbone"
    if not (d / "config.json").exists():
        build_tiny_backbone(d, seed=0)
    return str(d)


def embed_config(model: str, catalog: str, out: str, endpoint: str | None, extra: list[str]):  # type: ignore[no-untyped-def]
    from vlm2rec_ray.config import EmbedJobConfig, load_config

    return load_config(EmbedJobConfig, None, [f"model.name={model}", "model_version=bench", f"output_uri={out}",
                                              f"catalog_uri={catalog}", "dt=2026-01-01", "progress=false",
                                              *([f"endpoint_url={endpoint}"] if endpoint else []), *extra])


def model_throughput(cfg, catalog: str, endpoint: str | None, threads: int, repeats: int = 2) -> float:  # type: ignore[no-untyped-def]
    """Items/s of the encoder alone on the catalog's decoded images, batches of ``cfg.batch_size``."""
    import torch

    from vlm2rec_ray import storage
    from vlm2rec_ray.data.catalog import read_catalog, resolve_image_uri
    from vlm2rec_ray.data.images import load_image
    from vlm2rec_ray.embed.predictor import load_encoder

    table = read_catalog(catalog, endpoint=endpoint)
    titles = table.column("title").to_pylist()
    uris = [resolve_image_uri(u, catalog) for u in table.column("image_uri").to_pylist()]
    with ThreadPoolExecutor(16) as pool:
        images = list(pool.map(lambda u: load_image(u, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels,
                                                    endpoint=endpoint)[0], uris))
    assert all(im is not None for im in images)
    torch.set_num_threads(threads)
    enc = load_encoder(cfg)
    bs = cfg.batch_size
    best = 0.0
    with torch.inference_mode():
        enc.encode_items(titles[:bs], images[:bs])  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            for s in range(0, len(titles), bs):
                enc.encode_items(titles[s:s + bs], images[s:s + bs])
            best = max(best, len(titles) / (time.perf_counter() - t0))
    _ = storage
    return best


def throughput(args: argparse.Namespace) -> dict:
    from vlm2rec_ray.embed.pipeline import format_summary, run_embed_items
    from vlm2rec_ray.runtime import init_local_ray

    proc, endpoint = (start_moto() if args.storage == "s3" else (None, None))
    tmp = tempfile.mkdtemp(prefix="embed-bench-")
    try:
        if endpoint:
            from vlm2rec_ray import storage

            storage.s3_client(endpoint).create_bucket(Bucket="bench-catalog")
            base = "s3://bench-catalog/data"
        else:
            base = str(Path(tmp) / "data")
        t0 = time.perf_counter()
        catalog = make_catalog(base, args.items, args.image_size, endpoint)
        print(f"catalog: {args.items} items at {base} ({time.perf_counter() - t0:.1f} s to build)", flush=True)
        model = args.model or model_dir()
        out = "s3://bench-catalog/emb" if endpoint else str(Path(tmp) / "emb")
        cfg = embed_config(model, catalog, out, endpoint, [f"batch_size={args.batch_size}", *args.set])
        init_local_ray(num_cpus=os.cpu_count())
        t0 = time.perf_counter()
        summary = run_embed_items(cfg)
        wall = time.perf_counter() - t0
        print(format_summary(summary), flush=True)
        import ray

        ray.shutdown()
        threads = max(1, int(cfg.cpus_per_actor))
        model_ips = model_throughput(cfg, catalog, endpoint, threads)
        pipe_ips = args.items / wall
        result = {"items": args.items, "storage": args.storage, "batch_size": cfg.batch_size,
                  "deterministic": cfg.deterministic, "image_size": args.image_size, "cpus": os.cpu_count(),
                  "pipeline_items_per_s": round(pipe_ips, 1), "pipeline_wall_s": round(wall, 2),
                  "model_items_per_s": round(model_ips, 1), "ratio": round(pipe_ips / model_ips, 3)}
        print(f"pipeline {pipe_ips:.1f} items/s ({args.storage} -> Parquet, {wall:.1f} s incl. start-up) | model "
              f"alone {model_ips:.1f} items/s (batch {cfg.batch_size}, {threads} thread) | ratio {pipe_ips / model_ips:.2f} "
              "(target >= 0.85)")
        return result
    finally:
        if proc is not None:
            proc.terminate()


def _session_pss(root_pid: int, exclude: set[int]) -> tuple[float, float]:
    import psutil

    me = psutil.Process(root_pid)
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        if p.pid in exclude:
            continue
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return me.memory_info().rss / 2**20, total / 2**20


def memory_child(args: argparse.Namespace) -> dict:
    from vlm2rec_ray.embed.pipeline import run_embed_items
    from vlm2rec_ray.runtime import init_local_ray

    proc, endpoint = start_moto()
    try:
        from vlm2rec_ray import storage

        storage.s3_client(endpoint).create_bucket(Bucket="bench-catalog")
        catalog = make_catalog("s3://bench-catalog/data", args.items, args.image_size, endpoint)
        cfg = embed_config(args.model or model_dir(), catalog, "s3://bench-catalog/emb", endpoint,
                           [f"batch_size={args.batch_size}", *args.set])
        init_local_ray(num_cpus=os.cpu_count())
        peaks = {"driver_rss_mib": 0.0, "ray_pss_mib": 0.0}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                rss, pss = _session_pss(os.getpid(), {proc.pid})
                peaks["driver_rss_mib"] = max(peaks["driver_rss_mib"], rss)
                peaks["ray_pss_mib"] = max(peaks["ray_pss_mib"], pss)
                stop.wait(0.25)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.perf_counter()
        summary = run_embed_items(cfg)
        wall = time.perf_counter() - t0
        stop.set()
        t.join()
        peaks["driver_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"items": args.items, "ok": summary["ok"], "wall_s": round(wall, 1), **{k: round(v, 1) for k, v in peaks.items()}}
    finally:
        proc.terminate()


def memory(args: argparse.Namespace) -> list[dict]:
    sizes = [int(x) for x in args.memory.split(",")]
    rows = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--memory-child", "--items", str(n), "--image-size", str(args.image_size),
               "--batch-size", str(args.batch_size), *(["--model", args.model] if args.model else []),
               *functools.reduce(operator.iadd, (["--set", s] for s in args.set), [])]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{n:>7} items: driver RSS peak {row['driver_rss_mib']:.0f} MiB, Ray instance PSS peak "
              f"{row['ray_pss_mib']:.0f} MiB ({row['wall_s']} s)", flush=True)
        rows.append(row)
    lo, hi = rows[0], rows[-1]
    for k in ("driver_rss_mib", "ray_pss_mib"):
        print(f"{k}: {hi['items']} / {lo['items']} items = {hi[k] / lo[k]:.2f} (target <= 1.2)")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=3000)
    p.add_argument("--image-size", type=int, default=96, help="mean image side in pixels")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--storage", choices=("s3", "local"), default="s3")
    p.add_argument("--model", default=None, help="model dir (default: the tiny random Qwen2.5-VL)")
    p.add_argument("--set", action="append", default=[], help="extra EmbedJobConfig override key=value")
    p.add_argument("--memory", default=None, help="comma-separated catalog sizes, e.g. 2000,20000")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = p.parse_args(argv)
    from vlm2rec_ray.runtime import configure_local_env

    configure_local_env()
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return 0
    result = memory(args) if args.memory else throughput(args)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
