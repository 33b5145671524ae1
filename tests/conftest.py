"""Shared fixtures: offline environment, tiny backbone, a real moto S3 server on loopback, local Ray."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("VLM2REC_BUILD_DIR", str(REPO / "build"))
os.environ["HF_HUB_OFFLINE"] = "1"  # no test may touch a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from vlm2rec_ray.runtime import configure_local_env  # noqa: E402

configure_local_env(os.environ["VLM2REC_BUILD_DIR"])


@pytest.fixture(autouse=True)
def _seed() -> None:
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init Qwen2.5-VL saved with save_pretrained (built once per session, offline)."""
    from vlm2rec_ray.model.tiny import build_tiny_backbone

    return build_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone"), seed=0)


def _free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1: all are held open until every one is chosen (ports picked one at a
    time may repeat, and a component given the same port as another fails to start)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@pytest.fixture(scope="session")
def moto_endpoint() -> str:
    """A real S3 HTTP endpoint on 127.0.0.1 (moto_server subprocess), exported as AWS_ENDPOINT_URL."""
    # Run this interpreter's moto (the pinned one): a `moto_server` found first on PATH may be another
    # install (e.g. pyenv's moto 5.2.1, whose CompleteMultipartUpload breaks pyarrow's Parquet writes).
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not come up on 127.0.0.1 within 30 s")
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = url
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    if old is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = old


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    """A fresh, uniquely named bucket on the moto server; returns its name."""
    from vlm2rec_ray.storage import s3_client

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client(moto_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray instance (2 CPUs, loopback, dashboard on for Train V2)."""
    import ray

    from vlm2rec_ray.runtime import init_local_ray

    # Workers export metrics (the S3 retry counter) every second, not every 10 s: tests read them soon after a run.
    init_local_ray(num_cpus=2, _system_config={"metrics_report_interval_ms": 1000})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
