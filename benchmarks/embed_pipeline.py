"""Embed pipeline benchmark: items/s of the whole run (S3 -> Parquet) vs the model's own forward throughput.

    python benchmarks/embed_pipeline.py                          # 1500 items on a moto S3 server, small model
    python benchmarks/embed_pipeline.py --model-size tiny --items 3000
    python benchmarks/embed_pipeline.py --storage local
    python benchmarks/embed_pipeline.py --memory 2000,20000      # peak memory as the catalog grows (tiny model)

Throughput mode builds a catalog of distinct titles and distinct random JPEGs (so no dedup flatters the
pipeline), uploads it to a moto S3 server on loopback (real HTTP; or a local dir with ``--storage local``),
runs ``run_embed_items`` (read, fetch, decode, model actor, Parquet write, manifest) and prints its items/s,
start-up of the model actor included. It then decodes the first ``--model-items`` images in this process and
times the model alone on them, on batches of the same size with the actor's torch thread count, two ways:
``encode_items`` (one padded P_T and one P_V forward per batch) and the actor's encoder core (dedup +
deterministic shape grouping; on CPU faster for mixed image sizes). It prints the ratio of the pipeline to
the faster of the two (target >= 0.85), twice:

- whole run: catalog rows / wall time of ``run_embed_items``, which includes a fixed start-up (planning, the
  census, Ray Data's start, the model actor importing torch and transformers and loading the weights: 9-19 s
  before the first batch comes out on the 2-core box, whatever the catalog size);
- the same on a warm cluster (``--warm-up N``: N other items go through the pipeline first, on the same Ray
  instance, as on a long-lived cluster that has run jobs before; the measured run's model actor still starts
  in a fresh process);
- steady state: the rate between the first and the last batch the actor finished (the run summary's
  ``encode_rows_per_s``, from the encoded rows' ``embedded_at``: the actor stamps each batch when it finishes
  it), i.e. what each further item costs.

The default model is a random 17M-parameter Qwen2.5-VL (``--model-size small``), heavy enough that its
forward pass bounds the run, as a real backbone on a GPU does. With the 0.2M test model (``tiny``) a forward
costs less CPU than GETting the image from the moto server on the same box, so that ratio measures moto.

The plain-loop peer (``plain_loop``) is what a user would otherwise write, as the paper's peers embed catalogs
offline: one process that, for each batch of ``--batch-size`` catalog rows, GETs each image with boto3 (or reads
it, ``--storage local``), decodes and resizes it exactly as the pipeline does (``decode_image``) and runs the same
model core as the actor (``BatchEncoder``, same torch thread count), in sequence; it writes nothing. It runs on
the same catalog after the pipeline, and the figures print side by side: pipeline / plain loop and pipeline /
model alone. Model loading is inside its wall time, as the actor's start-up is inside the pipeline's. On the
2-core box the pipeline's overlap of GETs, decoding and the model has one spare core to work with, so the ratio
stays near 1; on a GPU node (many CPUs for fetch/decode, the model on the GPU) the overlap is the gain.

Memory mode runs each catalog size in a fresh process and samples, every 0.25 s, the driver's RSS, the
summed PSS of every process of the Ray instance (driver, GCS, raylet, workers; not the moto server) and their
summed private memory (USS less object-store pages, see ``_session_pss``), and prints the peaks and their
ratio between the largest and smallest size (target <= 1.2).

On the 2-core CI box the model actor holds one core; fetch/decode tasks, Ray's own processes, the Parquet
writer and the moto server share the other, so the figures there measure that box as much as the pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Iterator
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


def model_dir(size: str = "tiny") -> str:
    """The offline random backbone of ``size`` (:data:`vlm2rec_ray.model.tiny.SHAPES`: ``tiny``, the test model;
    ``small``, 17M parameters whose forward bounds the pipeline on a CPU box, as a real backbone does on a GPU;
    ``3b``, Qwen2.5-VL-3B's layers in bf16, built on the GPU). With the 0.2M test model a forward costs less
    CPU than GETting the image from a moto server on the same box (~7 ms per object, client + server), so
    that ratio measures the object store, not the pipeline."""
    from vlm2rec_ray.model.tiny import build_tiny_backbone

    d = REPO / "build" / "bench" / f"{size}_backbone"
    if not (d / "config.json").exists():
        kwargs: dict = {}
        if size == "3b":
            import torch

            if not torch.cuda.is_available():
                raise SystemExit("--model-size 3b needs a CUDA GPU (3.4B parameters in bf16); use small on CPU")
            kwargs = {"device": "cuda", "dtype": torch.bfloat16}
        build_tiny_backbone(d, seed=0, shape=size, **kwargs)  # tokenizer + image processor + random weights
    return str(d)


def embed_config(model: str, catalog: str, out: str, endpoint: str | None, extra: list[str]):  # type: ignore[no-untyped-def]
    from vlm2rec_ray.config import EmbedJobConfig, load_config

    return load_config(EmbedJobConfig, None, [f"model.name={model}", "model_version=bench", f"output_uri={out}",
                                              f"catalog_uri={catalog}", "dt=2026-01-01", "progress=false",
                                              *([f"endpoint_url={endpoint}"] if endpoint else []), *extra])


def model_throughput(cfg, catalog: str, endpoint: str | None, threads: int, items: int,  # type: ignore[no-untyped-def]
                     repeats: int = 1) -> dict[str, float]:
    """Items/s of the model alone on the catalog's first ``items`` decoded images (decoded and resized as the
    pipeline does, before timing), batches of ``cfg.batch_size``, the actor's torch thread count:

    - ``forward``: ``encode_items`` (one padded P_T and one P_V forward per batch): the model's own throughput;
    - ``actor_core``: the actor's :class:`BatchEncoder` (dedup, deterministic shape grouping) on the same batches.
    """
    import torch

    from vlm2rec_ray.data.catalog import read_catalog, resolve_image_uri
    from vlm2rec_ray.embed import incremental
    from vlm2rec_ray.embed.predictor import BatchEncoder, load_encoder
    from vlm2rec_ray.model.prompts import clean_title

    table = read_catalog(catalog, endpoint=endpoint).slice(0, items)
    titles = table.column("title").to_pylist()
    uris = [resolve_image_uri(u, catalog) for u in table.column("image_uri").to_pylist()]
    from vlm2rec_ray.data.images import load_image

    with ThreadPoolExecutor(16) as pool:
        images = list(pool.map(lambda u: load_image(u, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels,
                                                    endpoint=endpoint)[0], uris))
    assert all(im is not None for im in images)
    torch.set_num_threads(threads)
    enc = load_encoder(cfg)
    deterministic = cfg.deterministic if cfg.deterministic is not None else True  # CPU actors default to True
    text_keys = [incremental.text_key([clean_title(t)]) for t in titles]
    image_keys = [f"image-{i}" for i in range(len(titles))]  # all distinct, as in the catalog
    bs = cfg.batch_size

    def forward() -> None:
        for s in range(0, len(titles), bs):
            enc.encode_items(titles[s:s + bs], images[s:s + bs])

    def actor_core() -> None:
        core = BatchEncoder(enc, batch_size=bs, deterministic=deterministic, fusion=cfg.model.fusion, cache_mib=0)
        for s in range(0, len(titles), bs):
            core.encode([[t] for t in titles[s:s + bs]], [[im] for im in images[s:s + bs]], text_keys[s:s + bs],
                        image_keys[s:s + bs])

    from vlm2rec_ray.model.flops import count_flops

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    out = {}
    with torch.inference_mode():
        for name, fn in (("forward", forward), ("actor_core", actor_core)):
            enc.encode_items(titles[:bs], images[:bs])  # warm-up
            sync()
            best = 0.0
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                sync()
                best = max(best, len(titles) / (time.perf_counter() - t0))
            out[name] = best
        # Model FLOPs per item (P_T + P_V forwards), each item alone: no padding counted, so MFU is never flattered
        n = min(bs, len(titles))
        out["flops_per_item"] = sum(count_flops(lambda i=i: enc.encode_items(titles[i:i + 1], images[i:i + 1]))
                                    for i in range(n)) / n
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out["dtype"] = str(next(enc.backbone.parameters()).dtype).removeprefix("torch.")
    return out


def plain_loop(cfg, catalog: str, endpoint: str | None, threads: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """The single-process peer: per batch, boto3 GET (or a local read) -> ``decode_image`` -> the actor's encoder core,
    one after another (see the module doc). Returns items/s over the whole loop (model load included) and from the
    first GET on, and the seconds spent in each part."""
    import torch

    from vlm2rec_ray import storage
    from vlm2rec_ray.data.catalog import read_catalog, resolve_image_uri
    from vlm2rec_ray.data.images import decode_image
    from vlm2rec_ray.embed import incremental
    from vlm2rec_ray.embed.predictor import BatchEncoder, load_encoder
    from vlm2rec_ray.model.prompts import clean_title

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    enc = load_encoder(cfg)
    deterministic = cfg.deterministic if cfg.deterministic is not None else True
    core = BatchEncoder(enc, batch_size=cfg.batch_size, deterministic=deterministic, fusion=cfg.model.fusion,
                        cache_mib=0)
    table = read_catalog(catalog, endpoint=endpoint)
    titles = table.column("title").to_pylist()
    uris = [resolve_image_uri(u, catalog) for u in table.column("image_uri").to_pylist()]
    client = storage.s3_client(endpoint) if endpoint else None
    t_loop = time.perf_counter()
    get_s = decode_s = model_s = 0.0
    bs = cfg.batch_size
    with torch.inference_mode():
        for s in range(0, len(titles), bs):
            images = []
            for uri in uris[s:s + bs]:
                t = time.perf_counter()
                if client is not None:
                    bucket, _, key = uri.removeprefix("s3://").partition("/")
                    data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
                else:
                    data = Path(uri).read_bytes()
                t1 = time.perf_counter()
                im, reason = decode_image(data, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
                if im is None:
                    raise RuntimeError(f"{uri}: {reason}")
                images.append(im)
                get_s, decode_s = get_s + t1 - t, decode_s + time.perf_counter() - t1
            t = time.perf_counter()
            batch_titles = titles[s:s + bs]
            core.encode([[x] for x in batch_titles], [[im] for im in images],
                        [incremental.text_key([clean_title(x)]) for x in batch_titles],
                        [f"image-{i}" for i in range(s, s + len(batch_titles))])
            model_s += time.perf_counter() - t
    end = time.perf_counter()
    n = len(titles)
    return {"items_per_s": n / (end - t0), "loop_items_per_s": n / (end - t_loop), "wall_s": end - t0,
            "get_s": get_s, "decode_s": decode_s, "model_s": model_s}


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
        model = args.model or model_dir(args.model_size or "small")
        out = "s3://bench-catalog/emb" if endpoint else str(Path(tmp) / "emb")
        extra = [f"batch_size={args.batch_size}", *args.set]
        if args.output_format == "iceberg":  # sqlite SQL catalog in the temp dir; the warehouse is `out`
            extra += ["output_format=iceberg", f"iceberg.catalog.uri=sqlite:///{Path(tmp) / 'catalog.db'}"]
        cfg = embed_config(model, catalog, out, endpoint, extra)
        init_local_ray(num_cpus=os.cpu_count())
        if args.warm_up:
            # As on a long-lived cluster that re-embeds nightly: Ray Data's helper actors and the worker pool are
            # up already. The measured run still starts its own model actor (a fresh process: imports, weights).
            w0 = time.perf_counter()
            warm = make_catalog(base + "-warm-up", args.warm_up, args.image_size, endpoint, seed=1)
            run_embed_items(embed_config(model, warm, out + "-warm-up", endpoint, [*extra, "iceberg.namespace=warmup"]))
            print(f"warm-up: {args.warm_up} other items through the pipeline first ({time.perf_counter() - w0:.1f} s)",
                  flush=True)
        t0 = time.perf_counter()
        summary = run_embed_items(cfg)
        wall = time.perf_counter() - t0
        print(format_summary(summary), flush=True)
        import ray

        ray.shutdown()
        # When the model's batches came out (the summary reads the encoded rows' embedded_at stamps)
        timeline = {"first_batch_s": summary["first_batch_s"],
                    "steady_items_per_s": summary["encode_rows_per_s"] or float("nan")}  # nan: a single batch
        threads = max(1, int(cfg.cpus_per_actor))
        plain = plain_loop(cfg, catalog, endpoint, threads)
        model = model_throughput(cfg, catalog, endpoint, threads, min(args.items, args.model_items))
        pipe_ips = args.items / wall
        # The model's own throughput: the faster of the two ways of running it alone (on CPU, the actor's shape
        # grouping beats one padded batch of mixed-size images), so the ratio is never flattered.
        best = max(model["forward"], model["actor_core"])
        ratio = pipe_ips / best
        steady_ratio = timeline["steady_items_per_s"] / best
        from vlm2rec_ray.model.flops import mfu, peak_flops

        dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(model["dtype"], model["dtype"])
        peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(model["device"], dtype)
        flops = model["flops_per_item"]
        result = {"items": args.items, "warm_up": args.warm_up, "storage": args.storage,
                  "output_format": args.output_format,
                  "model": Path(cfg.model.name).name,
                  "batch_size": cfg.batch_size, "deterministic": cfg.deterministic, "image_size": args.image_size,
                  "cpus": os.cpu_count(), "pipeline_items_per_s": round(pipe_ips, 1), "pipeline_wall_s": round(wall, 2),
                  "model_items_per_s": round(model["forward"], 1), "actor_core_items_per_s": round(model["actor_core"], 1),
                  "ratio": round(ratio, 3), **{k: round(v, 2) for k, v in timeline.items()},
                  "plain_loop_items_per_s": round(plain["items_per_s"], 1),
                  "plain_ratio": round(pipe_ips / plain["items_per_s"], 3),
                  "plain_loop_parts_s": {k: round(plain[k], 1) for k in ("get_s", "decode_s", "model_s")},
                  "steady_ratio": round(steady_ratio, 3), "load_avg_1m": round(os.getloadavg()[0], 2),
                  "device": model["device"], "dtype": model["dtype"], "gflops_per_item": round(flops / 1e9, 3),
                  "mfu_model": round(mfu(flops, best, peak), 4) if peak else None,
                  "mfu_pipeline": round(mfu(flops, pipe_ips, peak), 4) if peak else None,
                  "mfu_pipeline_steady": round(mfu(flops, timeline["steady_items_per_s"], peak), 4) if peak else None}
        cluster = ", warm cluster" if args.warm_up else ""
        print(f"pipeline {pipe_ips:.1f} items/s ({args.storage} -> {args.output_format}, {wall:.1f} s incl. actor start-up"
              f"{cluster}) | model "
              f"alone {best:.1f} items/s (batch {cfg.batch_size}, {threads} thread; padded encode_items "
              f"{model['forward']:.1f}, the actor's encoder core {model['actor_core']:.1f}) | ratio {ratio:.2f} "
              "(target >= 0.85)")
        print(f"pipeline / plain loop = {pipe_ips / plain['items_per_s']:.2f} (plain loop {plain['items_per_s']:.1f} "
              f"items/s, {plain['wall_s']:.1f} s incl. model load: GET {plain['get_s']:.1f} s, decode "
              f"{plain['decode_s']:.1f} s, model {plain['model_s']:.1f} s, no write) | pipeline / model alone = "
              f"{ratio:.2f}")
        print(f"timeline: first batch embedded {timeline['first_batch_s']:.1f} s after the start (plan, census, actor "
              f"start-up, first forward); from it to the last batch {timeline['steady_items_per_s']:.1f} items/s = "
              f"{steady_ratio:.2f} of the model alone (steady state)")
        achieved = f"{flops / 1e9:.2f} GFLOP per item ({model['device']}, {model['dtype']}): model alone " \
                   f"{flops * best / 1e12:.3f} TFLOP/s, pipeline {flops * pipe_ips / 1e12:.3f} TFLOP/s"
        if peak:
            print(f"{achieved}; MFU (peak {peak / 1e12:.0f} TFLOP/s): model alone {result['mfu_model']:.1%}, pipeline "
                  f"{result['mfu_pipeline']:.1%} whole run, {result['mfu_pipeline_steady']:.1%} steady (target >= 40%)")
        else:
            print(f"{achieved}; MFU: no peak figure for this device (pass --peak-tflops)")
        return result
    finally:
        if proc is not None:
            proc.terminate()


def _process_group(p) -> str:  # type: ignore[no-untyped-def]
    """A short label for a process of the Ray instance: its title (``ray::IDLE``, ``raylet``) or script name."""
    cmd = p.cmdline() or [p.name()]
    head = cmd[0]
    if "python" in Path(head).name and len(cmd) > 1:
        head = Path(cmd[1]).name if not cmd[1].startswith("-") else " ".join(cmd[1:3])
    head = head.split()[0] if head.startswith("ray::") else Path(head).name
    return head[:60]


def _object_store_pages(pid: int) -> float:
    """MiB of the object store's shared memory (``/dev/shm/plasma*``) that process ``pid`` alone maps.

    Blocks a task reads or writes are pages of that mapping; the kernel counts them as the process's private
    memory (USS) when no other process maps them at the moment, so a write task holding a file's worth of
    blocks looks like it grew although it allocated nothing. Those pages belong to the object store, which
    ``object_store_memory`` bounds (and which spills to disk beyond it).
    """
    kib = 0
    in_store = False
    try:
        with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    in_store = "plasma" in line
                elif in_store and line.startswith(("Private_Clean:", "Private_Dirty:")):
                    kib += int(line.split()[1])
    except OSError:
        return 0.0
    return kib / 1024


def _session_pss(root_pid: int) -> tuple[float, float, dict[str, float], float, dict[str, float]]:
    """``(driver RSS, summed PSS of the driver and all its descendants, PSS by process group, summed private
    memory, private memory by process group)`` in MiB.

    PSS splits shared pages (the object store's shared memory, which every worker that reads or writes a
    block maps, and shared libraries) among the processes that map them. "Private memory" is USS (pages only
    this process maps) less the object store's pages (see :func:`_object_store_pages`): what the process
    itself allocated (heap, anonymous maps), the number a leak would show in.
    """
    import psutil

    me = psutil.Process(root_pid)
    total = total_private = 0.0
    groups: dict[str, float] = {}
    private_groups: dict[str, float] = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            pss = info.pss / 2**20
            uss = info.uss / 2**20
            private = uss - _object_store_pages(p.pid) if uss > 100 else uss  # (smaps is slow to read)
            name = "driver" if p.pid == root_pid else _process_group(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += pss
        total_private += private
        groups[name] = groups.get(name, 0.0) + pss
        private_groups[name] = private_groups.get(name, 0.0) + private
    return me.memory_info().rss / 2**20, total, groups, total_private, private_groups


@contextlib.contextmanager
def peak_memory(*, digits: int | None = 1, every_s: float = 0.25) -> Iterator[dict]:
    """Sample :func:`_session_pss` every ``every_s`` seconds while the block runs; the yielded dict holds the
    peaks when it exits: ``driver_rss_mib``, ``tree_pss_mib``, ``by_process_at_peak`` (PSS),
    ``tree_private_mib`` and ``by_process_private_at_peak`` (private memory less object-store pages, see
    :func:`_session_pss`; MiB, rounded to ``digits``; None = whole MiB as int)."""
    peaks: dict = {"driver_rss_mib": 0.0, "tree_pss_mib": 0.0, "by_process_at_peak": {}, "tree_private_mib": 0.0,
                   "by_process_private_at_peak": {}}
    stop = threading.Event()

    def ordered(groups: dict[str, float]) -> dict[str, float]:
        return {k: round(v, digits) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}

    def sample() -> None:
        while not stop.is_set():
            rss, pss, groups, private, private_groups = _session_pss(os.getpid())
            peaks["driver_rss_mib"] = max(peaks["driver_rss_mib"], rss)
            if pss > peaks["tree_pss_mib"]:
                peaks["tree_pss_mib"] = pss
                peaks["by_process_at_peak"] = ordered(groups)
            if private > peaks["tree_private_mib"]:
                peaks["tree_private_mib"] = private
                peaks["by_process_private_at_peak"] = ordered(private_groups)
            stop.wait(every_s)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield peaks
    finally:
        stop.set()
        t.join()


def memory_child(args: argparse.Namespace) -> dict:
    """One catalog size, in a fresh process: start Ray, run the pipeline, sample memory every 0.25 s."""
    from vlm2rec_ray.embed.pipeline import run_embed_items
    from vlm2rec_ray.runtime import init_local_ray

    cfg = embed_config(args.model or model_dir(args.model_size or "tiny"), args.catalog,
                       f"s3://bench-catalog/emb{args.items}", args.endpoint, [f"batch_size={args.batch_size}", *args.set])
    init_local_ray(num_cpus=os.cpu_count())
    with peak_memory(digits=1) as peaks:
        t0 = time.perf_counter()
        summary = run_embed_items(cfg)
        wall = time.perf_counter() - t0
    peaks["ray_pss_mib"] = peaks.pop("tree_pss_mib")
    peaks["driver_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"items": args.items, "ok": summary["ok"], "wall_s": round(wall, 1),
            **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in peaks.items()}}


def memory(args: argparse.Namespace) -> list[dict]:
    """Each size in a fresh process against one moto server; catalogs are built here, outside the measured
    processes (the moto server is not measured either)."""
    from vlm2rec_ray import storage

    sizes = [int(x) for x in args.memory.split(",")]
    rows = []
    proc, endpoint = start_moto()
    try:
        storage.s3_client(endpoint).create_bucket(Bucket="bench-catalog")
        for n in sizes:
            catalog = make_catalog(f"s3://bench-catalog/n{n}", n, args.image_size, endpoint)
            cmd = [sys.executable, __file__, "--memory-child", "--items", str(n), "--image-size", str(args.image_size),
                   "--batch-size", str(args.batch_size), "--endpoint", endpoint, "--catalog", catalog,
                   *(["--model", args.model] if args.model else []),
                   *(["--model-size", args.model_size] if args.model_size else []),
                   *functools.reduce(operator.iadd, (["--set", s] for s in args.set), [])]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{n:>7} items: driver RSS peak {row['driver_rss_mib']:.0f} MiB, Ray instance PSS peak "
                  f"{row['ray_pss_mib']:.0f} MiB, private memory peak {row['tree_private_mib']:.0f} MiB "
                  f"({row['wall_s']} s); PSS at the peak: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in list(row["by_process_at_peak"].items())[:6]), flush=True)
            rows.append(row)
    finally:
        proc.terminate()
    lo, hi = rows[0], rows[-1]
    for k in ("driver_rss_mib", "ray_pss_mib", "tree_private_mib"):
        print(f"{k}: {hi['items']} / {lo['items']} items = {hi[k] / lo[k]:.2f} (target <= 1.2)")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1500)
    p.add_argument("--image-size", type=int, default=96, help="mean image side in pixels")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--storage", choices=("s3", "local"), default="s3")
    p.add_argument("--output-format", choices=("parquet", "iceberg"), default="parquet",
                   help="iceberg: a table in a sqlite SQL catalog (temp dir), the warehouse on --storage")
    p.add_argument("--model", default=None, help="model dir (default: a random backbone of --model-size)")
    p.add_argument("--model-size", choices=("tiny", "small", "3b"), default=None,
                   help="random backbone built offline: small (17M, default for throughput), tiny (0.2M, the test "
                        "model; default for --memory) or 3b (Qwen2.5-VL-3B-shaped, bf16; needs a GPU)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak dense TFLOP/s for MFU (default: known GPUs' bf16 peak, see "
                        "vlm2rec_ray.model.flops.PEAK_TFLOPS)")
    p.add_argument("--model-items", type=int, default=400, help="items the model-alone measurement runs on")
    p.add_argument("--warm-up", type=int, default=0, metavar="N",
                   help="first run N other items through the pipeline on the same Ray instance, as a long-lived "
                        "cluster has run jobs before (Ray Data's helper actors up); the measured run's model actor "
                        "still starts fresh")
    p.add_argument("--set", action="append", default=[], help="extra EmbedJobConfig override key=value")
    p.add_argument("--memory", default=None, help="comma-separated catalog sizes, e.g. 2000,20000")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--endpoint", default=None, help=argparse.SUPPRESS)
    p.add_argument("--catalog", default=None, help=argparse.SUPPRESS)
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
