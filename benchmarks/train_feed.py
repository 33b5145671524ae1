"""Training samples/s through the real Ray Train + Ray Data feed against the same steps on batches already in
memory, in one run: same model, same batch, same workers, same DeepSpeed engines.

    python benchmarks/train_feed.py                        # the demo's VLM2Rec settings, tiny model, 2 CPU workers
    python benchmarks/train_feed.py --store local          # dataset on local disk (the demo's store); GETs not counted
    python benchmarks/train_feed.py --model /path/to/Qwen2.5-VL-3B-Instruct --use-gpu --workers 8 \\
        --batch 8 --num-items 12000 --num-users 20000 --image-size 224 --pixels 50176     # on a GPU node

The settings are the demo's (``jobs/configs/demo.yaml``, run VLM2Rec: ZeRO-2, fp32, batch 8 per worker, 2 workers
x 0.5 CPU, task batch 16 x 0.25 CPU, 56x56 images) on the demo's synthetic catalog (240 items, 300 users), with
the dataset in S3 (a moto server behind a recording proxy on loopback, so every image GET is counted) unless
``--store local``. The trainer's own data path runs unchanged (``prepare_training_rows``,
``build_train_dataset``, ``ensure_item_table``, ``get_dataset_shard("train")``, ``to_train_batch``); only the
worker loop is this file's: epoch 0 comes from the feed (the warm-up: first steps, JIT, cold caches; its batches
are kept), then each further epoch from the feed is followed by as many steps on the kept batches from memory
(alternating, so drift on a shared box hits both alike). Ratio = feed samples/s (epochs 1..) / in-memory
samples/s; target >= 0.9. ``data_wait_frac`` is the loop's: the share of wall time spent waiting for the next
batch (``train/loop.py``). Image GETs are counted at the proxy: before training (the item pass) and during fit.
``--report-every N`` calls ``ray.train.report`` every N steps in both phases, as the loop did every
``train.log_every`` steps before issue 18 (Ray Train V2's controller takes one pending report per worker every
2 s, so frequent reports cap the step rate; ``report_frac`` is the time spent in them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _feed_setup(ctx: dict[str, Any]) -> None:
    """What ``train_loop_per_worker`` reads before its first epoch: the item table (once per worker)."""
    import random

    from vlm2rec_ray.config import TrainJobConfig
    from vlm2rec_ray.train.data import ItemTable

    ctx["items"] = ItemTable.from_refs(ctx["config"]["run"]["items"])
    ctx["negatives"] = TrainJobConfig.model_validate(ctx["config"]["job"]).objective.num_sampled_negatives
    ctx["rng"] = random.Random(ctx["rank"])


def _feed_batch(arrow_batch: Any, ctx: dict[str, Any]) -> Any:
    """One micro-batch from the feed, exactly as ``train_loop_per_worker`` turns it into a TrainBatch."""
    from vlm2rec_ray.train.data import to_train_batch

    return to_train_batch(arrow_batch, ctx["items"], num_negatives=ctx["negatives"], rng=ctx["rng"])


def bench_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: epoch 0 from the feed (warm-up; its batches are kept), then rounds of one feed epoch and
    the same number of steps on the kept batches from memory, alternating so drift hits both alike."""
    import json

    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from vlm2rec_ray.config import TrainJobConfig
    from vlm2rec_ray.train.deepspeed_config import build_deepspeed_config
    from vlm2rec_ray.train.loop import build_engine, quiet_worker_output, train_step

    cfg = TrainJobConfig.model_validate(config["job"])
    run = config["run"]
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    device = ray.train.torch.get_device()
    t = cfg.train
    engine, module = build_engine(cfg, build_deepspeed_config(cfg), device)
    objective = module.objective
    gather = cfg.objective.gather_negatives and world > 1
    shard = ray.train.get_dataset_shard("train")
    micro_per_epoch = int(run["steps_per_epoch"]) * t.grad_accum
    rows_per_micro = t.per_device_batch_size * world
    report_every = int(run.get("report_every") or 0)
    feed_ctx: dict[str, Any] = {"config": config, "rank": rank}
    _feed_setup(feed_ctx)
    quiet_worker_output()
    kept: list[Any] = []

    def report(i: int) -> float:
        """As the real loop does every train.log_every steps (time returned, counted in the phase's wall)."""
        if not report_every or (i + 1) % report_every:
            return 0.0
        t0 = time.perf_counter()
        ray.train.report({"step": i})
        return time.perf_counter() - t0

    def feed_epoch(epoch: int) -> dict[str, float]:
        dist.barrier()
        buffer = max(cfg.data.shuffle_buffer_rows, t.per_device_batch_size) if cfg.data.shuffle_buffer_rows else None
        it = shard.iter_batches(batch_size=t.per_device_batch_size, batch_format="pyarrow", drop_last=True,
                                local_shuffle_buffer_size=buffer, local_shuffle_seed=t.seed + epoch if buffer else None)
        wait = rep = 0.0
        micro = 0
        t0 = t_wait = time.perf_counter()
        for arrow_batch in it:
            batch = _feed_batch(arrow_batch, feed_ctx)
            wait += time.perf_counter() - t_wait
            train_step(engine, batch, objective, gather=gather)
            if epoch == 0:
                kept.append(batch)
            rep += report(micro)
            micro += 1
            if micro >= micro_per_epoch:
                break
            t_wait = time.perf_counter()
        return {"wall_s": time.perf_counter() - t0, "wait_s": wait, "report_s": rep, "micro": micro}

    def memory_epoch() -> dict[str, float]:
        dist.barrier()
        rep = 0.0
        t0 = time.perf_counter()
        for i in range(micro_per_epoch):
            train_step(engine, kept[i % len(kept)], objective, gather=gather)
            rep += report(i)
        return {"wall_s": time.perf_counter() - t0, "report_s": rep, "micro": micro_per_epoch}

    epochs = [feed_epoch(0)]
    memory: list[dict[str, float]] = []
    for epoch in range(1, max(2, t.epochs)):
        epochs.append(feed_epoch(epoch))
        memory.append(memory_epoch())
    timed = epochs[1:]
    micro_timed = sum(e["micro"] for e in timed)
    feed_s = sum(e["wall_s"] for e in timed)
    memory_s = sum(e["wall_s"] for e in memory)
    metrics = {
        "feed_samples_per_s": micro_timed * rows_per_micro / feed_s,
        "memory_samples_per_s": sum(e["micro"] for e in memory) * rows_per_micro / memory_s,
        "data_wait_frac": sum(e["wait_s"] for e in timed) / feed_s,
        "report_frac_feed": sum(e["report_s"] for e in timed) / feed_s,
        "report_frac_memory": sum(e["report_s"] for e in memory) / memory_s,
        "epoch0_samples_per_s": epochs[0]["micro"] * rows_per_micro / epochs[0]["wall_s"],
        "epoch0_data_wait_frac": epochs[0]["wait_s"] / epochs[0]["wall_s"],
        "feed_epochs": [[round(e["wall_s"], 2), round(e["wait_s"] / e["wall_s"], 3), e["micro"]] for e in epochs],
        "memory_epochs": [round(e["wall_s"], 2) for e in memory],
    }
    if rank == 0:
        Path(run["metrics_path"]).write_text(json.dumps(metrics))
    ray.train.report({"done": 1})


def _start_s3(data_dir: Path) -> tuple[Any, Any, str, str]:
    """A moto server, a recording proxy in front of it, and the dataset uploaded (directly, not counted)."""
    import socket

    from tests.faults import FaultPlan, FaultProxy
    from vlm2rec_ray.storage import s3_client, upload_dir

    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    upstream = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.time() > deadline:
                moto.kill()
                raise RuntimeError("moto server did not start within 30 s") from None
            time.sleep(0.1)
    s3_client(upstream).create_bucket(Bucket="bench")
    upload_dir(data_dir, "s3://bench/dataset", endpoint=upstream)
    proxy = FaultProxy(upstream, FaultPlan(error_rate=0.0, drop_rate=0.0, slow_rate=0.0)).__enter__()
    return moto, proxy, proxy.url, "s3://bench/dataset"


def _image_gets(proxy: Any) -> int:
    return 0 if proxy is None else sum(1 for m, p in proxy.plan.requests if m == "GET" and "/images/" in p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["s3", "local"], default="s3")
    parser.add_argument("--model", default=None, help="backbone dir (default: the tiny offline Qwen2.5-VL)")
    parser.add_argument("--run", default="VLM2Rec", help="the demo run whose settings are used")
    parser.add_argument("--epochs", type=int, default=3, help="feed epochs (the first is the warm-up; each later one "
                        "is followed by as many in-memory steps)")
    parser.add_argument("--report-every", type=int, default=0, help="ray.train.report every N steps in both "
                        "phases, as the loop did every train.log_every before issue 18 (0 = never, as the loop now "
                        "does between checkpoints)")
    parser.add_argument("--workers", type=int, default=None, help="default: the demo's (2)")
    parser.add_argument("--batch", type=int, default=None, help="rows per worker per step (default: the demo's 8)")
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--num-items", type=int, default=240)
    parser.add_argument("--num-users", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=32, help="stored image side (the demo's 32)")
    parser.add_argument("--pixels", type=int, default=None, help="model min/max_pixels (default: the demo's 3136)")
    args = parser.parse_args(argv)

    from vlm2rec_ray.runtime import configure_local_env

    configure_local_env()
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    from vlm2rec_ray.config import TrainJobConfig, _merge, load_config
    from vlm2rec_ray.data.synthetic import generate_synthetic
    from vlm2rec_ray.demo import DEFAULT_CONFIG, DemoConfig, train_config
    from vlm2rec_ray.train.data import (
        build_train_dataset,
        ensure_item_table,
        prepare_training_rows,
        steps_per_epoch,
    )
    from vlm2rec_ray.train.trainer import build_trainer, connect_ray

    tmp = tempfile.TemporaryDirectory(prefix="vlm2rec-feed-")
    root = Path(tmp.name)
    generate_synthetic(str(root / "dataset"), num_items=args.num_items, num_users=args.num_users,
                       image_size=args.image_size, seed=0)
    model = args.model
    if model is None:
        from vlm2rec_ray.model.tiny import build_tiny_backbone

        model = str(build_tiny_backbone(root / "tiny", seed=0))
    moto = proxy = None
    endpoint, dataset = None, str(root / "dataset")
    if args.store == "s3":
        moto, proxy, endpoint, dataset = _start_s3(root / "dataset")
    try:
        demo = load_config(DemoConfig, DEFAULT_CONFIG, [f"store={root / 'demo'}"])
        tree = train_config(demo, args.run).model_dump(mode="json", exclude_unset=True)
        over: dict[str, Any] = {"model": {"name": model}, "data": {"dataset_uri": dataset},
                                "storage": {"endpoint_url": endpoint}, "output_uri": str(root / "out"),
                                "train": {"epochs": args.epochs}, "scaling": {"use_gpu": args.use_gpu}}
        if args.workers:
            over["scaling"]["num_workers"] = args.workers
        if args.batch:
            over["train"]["per_device_batch_size"] = args.batch
        if args.pixels:
            over["model"].update({"min_pixels": args.pixels, "max_pixels": args.pixels})
        cfg = TrainJobConfig.model_validate(_merge(tree, over)).with_absolute_paths()
        connect_ray(None)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        t0 = time.perf_counter()
        prepared = prepare_training_rows(cfg)
        items = ensure_item_table(prepared, cfg)  # the item pass (the check, with data.check_images)
        prep_s = time.perf_counter() - t0
        gets_prepare = _image_gets(proxy)
        spe = steps_per_epoch(prepared.rows.num_rows, cfg)
        datasets = {"train": build_train_dataset(prepared, cfg)}
        report_every = args.report_every
        metrics_path = root / "metrics.json"
        run_info = {"steps_per_epoch": spe, "num_rows": prepared.rows.num_rows, "items": items,
                    "report_every": report_every,
                    "metrics_path": str(metrics_path)}
        t0 = time.perf_counter()
        result = build_trainer(cfg, datasets, run_info, train_loop=bench_loop).fit()
        fit_s = time.perf_counter() - t0
        gets_fit = _image_gets(proxy) - gets_prepare
        del result
        m = json.loads(metrics_path.read_text())
        ratio = m["feed_samples_per_s"] / m["memory_samples_per_s"]
        distinct = len({i for r in prepared.rows.to_pylist() for i in [r["target_id"], *r["history_ids"]]})
        s = cfg.scaling
        print(f"model: {args.model or 'tiny Qwen2.5-VL (offline)'}  run {args.run}  ZeRO-{cfg.train.zero_stage}  "
              f"{s.num_workers} workers x {cfg.train.per_device_batch_size} rows ({'GPU' if s.use_gpu else 'CPU'})  "
              f"{cfg.model.max_pixels} px  store {args.store}")
        print(f"rows {prepared.rows.num_rows}, distinct items referenced {distinct}, {spe} steps/epoch, "
              f"{args.epochs} epochs (epoch 0 = warm-up); prepare {prep_s:.1f} s, fit {fit_s:.1f} s")
        print(f"feed epochs [wall s, data_wait_frac, micro-batches]: {m['feed_epochs']}; in-memory epochs [wall s]: "
              f"{m['memory_epochs']}; ray.train.report every {report_every or '-'} steps")
        print(f"  feed (Ray Train + Ray Data), epochs 1..: {m['feed_samples_per_s']:7.1f} samples/s  "
              f"data_wait_frac {m['data_wait_frac']:.3f}  report_frac {m['report_frac_feed']:.3f}")
        print(f"  same steps, batches in memory:          {m['memory_samples_per_s']:7.1f} samples/s  "
              f"report_frac {m['report_frac_memory']:.3f}")
        print(f"  epoch 0 (warm-up) through the feed:     {m['epoch0_samples_per_s']:7.1f} samples/s  "
              f"data_wait_frac {m['epoch0_data_wait_frac']:.3f}")
        print(f"ratio feed / in-memory = {ratio:.3f}  (target >= 0.9: {'OK' if ratio >= 0.9 else 'BELOW'})  "
              f"load average {os.getloadavg()[0]:.1f}")
        if proxy is not None:
            print(f"image GETs: {gets_prepare} before training (prepare), {gets_fit} during fit = "
                  f"{gets_fit / args.epochs:.0f} per epoch (distinct images {distinct})")
        else:
            print("image GETs: not counted (--store local)")
    finally:
        if proxy is not None:
            proxy.__exit__(None, None, None)
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
