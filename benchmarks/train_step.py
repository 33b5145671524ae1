"""Step time of WPCL + CRTR (VLM2Rec) against plain SFT, same model, same batch, same DeepSpeed engine.

    python benchmarks/train_step.py                               # tiny offline Qwen2.5-VL on CPU
    python benchmarks/train_step.py --model Qwen/Qwen2.5-VL-3B-Instruct --batch 8 --steps 20   # on a GPU

Builds one DeepSpeed engine per objective (single process, ZeRO-2 by default, the training code path:
``build_engine`` + ``train_step``), feeds both the identical batch (B histories of ``--history`` items, one
image and one title each, and B targets), and times whole optimizer steps in alternating rounds so drift hits
both alike. Prints the median step times, the ratio WPCL+CRTR / SFT (target <= 1.05: the objective's extra
work is a few B x N similarity matrices next to a VLM forward/backward), samples/s, and the objective's own
forward+backward time on fixed embeddings.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(batch: int, history: int, image_size: int, seed: int):  # type: ignore[no-untyped-def]
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from vlm2rec_ray.train.data import ItemTable, pack_image, to_train_batch

    rng = np.random.default_rng(seed)
    words = "red green blue lamp mug shirt chair watch book toy leather wooden small large".split()
    items: dict[str, list] = {k: [] for k in ("item_index", "title", "image", "width", "height", "reason")}

    def item(i: int) -> tuple[int, str]:
        title = " ".join(rng.choice(words, size=4)) + f" {i}"
        data, w, h = pack_image(Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)))
        for k, v in (("item_index", i), ("title", title), ("image", data), ("width", w), ("height", h),
                     ("reason", None)):
            items[k].append(v)
        return i, title

    cols: dict[str, list] = {k: [] for k in ("user_id", "target_index", "target_title", "history_indices",
                                             "history_titles")}
    for b in range(batch):
        hist = [item(b * 100 + h) for h in range(history)]
        index, title = item(b * 100 + 99)
        cols["user_id"].append(f"u{b}")
        cols["target_index"].append(index)
        cols["target_title"].append(title)
        cols["history_indices"].append([i for i, _ in hist])
        cols["history_titles"].append([t for _, t in hist])
    return to_train_batch(pa.table(cols), ItemTable([pa.table(items)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="backbone (default: the tiny offline Qwen2.5-VL)")
    parser.add_argument("--batch", type=int, default=8, help="rows per step (paper: 8)")
    parser.add_argument("--history", type=int, default=5, help="history items per row")
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per objective per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--no-checkpointing", action="store_true")
    args = parser.parse_args(argv)

    from vlm2rec_ray.runtime import configure_local_env

    configure_local_env()
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    import torch
    import torch.distributed as dist

    from vlm2rec_ray.config import TrainJobConfig
    from vlm2rec_ray.train.deepspeed_config import build_deepspeed_config
    from vlm2rec_ray.train.loop import build_engine, train_step

    use_gpu = torch.cuda.is_available()
    device = torch.device("cuda:0" if use_gpu else "cpu")
    dist.init_process_group("nccl" if use_gpu else "gloo")
    model = args.model
    tmp = tempfile.TemporaryDirectory(prefix="vlm2rec-bench-")
    if model is None:
        from vlm2rec_ray.model.tiny import build_tiny_backbone

        model = str(build_tiny_backbone(Path(tmp.name) / "tiny"))
    batch = _batch(args.batch, args.history, args.image_size, seed=0)

    engines = {}
    for variant in ("sft", "vlm2rec"):
        cfg = TrainJobConfig.model_validate({
            "model": {"name": model, "min_pixels": args.image_size ** 2, "max_pixels": args.image_size ** 2},
            "objective": {"variant": variant},
            "data": {"dataset_uri": "unused"},
            "train": {"per_device_batch_size": args.batch, "zero_stage": args.zero_stage, "precision": args.precision,
                      "gradient_checkpointing": not args.no_checkpointing, "cpu_shm_allreduce": False},
            "scaling": {"num_workers": 1, "use_gpu": use_gpu},
            "output_uri": tmp.name,
        })
        engine, module = build_engine(cfg, build_deepspeed_config(cfg), device)
        for _ in range(2):  # warm-up (allocations, lazy init)
            train_step(engine, batch, module.objective, gather=False)
        engines[variant] = (engine, module)

    def timed(variant: str) -> list[float]:
        engine, module = engines[variant]
        out = []
        for _ in range(args.steps):
            if use_gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(engine, batch, module.objective, gather=False)
            if use_gpu:
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return out

    times: dict[str, list[float]] = {"sft": [], "vlm2rec": []}
    for r in range(args.rounds):
        for variant in (("sft", "vlm2rec") if r % 2 == 0 else ("vlm2rec", "sft")):
            times[variant] += timed(variant)

    # The objective alone (forward + backward on fixed embeddings), to show its absolute cost.
    engine, module = engines["vlm2rec"]
    d = module.encoder.hidden_size
    emb = [torch.randn(args.batch, d, device=device, requires_grad=True) for _ in range(4)]
    obj_ms = {}
    for variant in ("sft", "vlm2rec"):
        objective = engines[variant][1].objective
        t0 = time.perf_counter()
        for _ in range(50):
            objective(*emb).total.backward()
        obj_ms[variant] = (time.perf_counter() - t0) / 50 * 1e3

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["vlm2rec"] / med["sft"]
    print(f"device: {device}  model: {model if args.model else 'tiny Qwen2.5-VL (offline)'}  ZeRO-{args.zero_stage}  "
          f"batch {args.batch} x history {args.history}  image {args.image_size}px  "
          f"{args.rounds} rounds x {args.steps} steps")
    for k, label in (("sft", "SFT (InfoNCE)"), ("vlm2rec", "WPCL + CRTR")):
        print(f"  {label:14s} step {med[k] * 1e3:8.1f} ms (median)  {args.batch / med[k]:7.1f} samples/s  "
              f"objective alone {obj_ms[k]:.2f} ms")
    print(f"step-time ratio WPCL+CRTR / SFT = {ratio:.3f}  (target <= 1.05: {'OK' if ratio <= 1.05 else 'ABOVE'})")
    # The ratio of two noisy medians can land below 1; the objective's own extra cost is the steadier figure.
    extra = (obj_ms["vlm2rec"] - obj_ms["sft"]) / (med["sft"] * 1e3)
    print(f"objective-only overhead (WPCL+CRTR - SFT) / SFT step = {extra * 100:+.2f}%")
    dist.destroy_process_group()
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
