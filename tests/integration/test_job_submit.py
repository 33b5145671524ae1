"""A real Ray head on 127.0.0.1 (`ray start --head`) with token authentication, as cluster/ deploys it; the
nightly job submitted with `ray job submit` (the token from the environment, as the README shows) against the
moto S3 server, its Parquet output checked, the cluster stopped. Without the token the job API refuses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO, free_ports
from vlm2rec_ray import storage

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


TOKEN = uuid.uuid4().hex + uuid.uuid4().hex


def _env(moto_endpoint: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # workers and the job driver use this venv
        RAY_AUTH_MODE="token",  # the head, its workers, the job and the CLI: every call carries the token
        RAY_AUTH_TOKEN=TOKEN,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        AWS_ENDPOINT_URL=moto_endpoint,
    )
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def ray_head(moto_endpoint: str, tmp_path: Path):
    """`ray start --head --block` in its own process group, every port chosen free on 127.0.0.1."""
    env = _env(moto_endpoint)
    temp_dir = REPO / "build" / f"rj{uuid.uuid4().hex[:6]}"  # short: Ray's unix sockets live under it
    names = ("--port", "--dashboard-port", "--node-manager-port", "--object-manager-port",
             "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--metrics-export-port", "--runtime-env-agent-port")
    ports = dict(zip(names, free_ports(len(names)), strict=True))  # distinct: Ray refuses a port given twice
    dash = ports["--dashboard-port"]
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2", "--disable-usage-stats",
           f"--temp-dir={temp_dir}", *[f"{k}={v}" for k, v in ports.items()]]
    log = open(tmp_path / "ray_start.log", "w")  # closed in finally
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:
            r = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, text=True, timeout=30)
            if r.returncode == 0:
                break
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"ray head did not come up: {(tmp_path / 'ray_start.log').read_text()[-3000:]}")
            time.sleep(2)
        yield address, env
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_nightly_job_submitted_to_a_local_head(ray_head, moto_endpoint: str, s3_bucket: str,
                                               tiny_backbone_dir: Path, tmp_path: Path) -> None:
    from vlm2rec_ray.data.synthetic import generate_synthetic

    address, env = ray_head
    for mode in ("disabled", "token"):  # no token sent; token auth on but no token at hand
        anonymous = {**{k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}, "RAY_AUTH_MODE": mode,
                     "HOME": str(tmp_path)}  # and no ~/.ray/auth_token to fall back on
        r = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=anonymous,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0, f"the job API answered without the token ({mode}): {r.stdout[-500:]}"
        print(f"\nwithout the token ({mode}): {(r.stderr or r.stdout).strip().splitlines()[-1][:200]}")
    dataset = f"s3://{s3_bucket}/dataset"
    generate_synthetic(dataset, num_items=40, num_users=24, image_size=32, seed=3, endpoint=moto_endpoint)
    out = f"s3://{s3_bucket}/warehouse"
    config = {
        "embed": {
            "model": {"name": str(tiny_backbone_dir), "min_pixels": 3136, "max_pixels": 3136},
            "model_version": "tiny-v1", "dataset_uri": dataset, "output_uri": out, "dt": "2026-11-22",
            "batch_size": 16, "num_actors": 1, "cpus_per_actor": 1, "preprocess_concurrency": 1,
            "progress": False,
        },
    }
    cfg_path = REPO / "build" / f"nightly-{uuid.uuid4().hex[:6]}.yaml"  # the working dir is uploaded; build/ is not
    cfg_path.write_text(yaml.safe_dump(config))
    job_id = f"nightly-{uuid.uuid4().hex[:8]}"
    try:
        r = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id,
             "--working-dir", str(REPO), "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--",
             "python", "jobs/nightly.py", "--config", str(cfg_path)],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=420)
    finally:
        cfg_path.unlink()
    logs = r.stdout[-4000:] + r.stderr[-4000:]
    status = subprocess.run([str(BIN / "ray"), "job", "status", job_id, "--address", address], env=env,
                            capture_output=True, text=True, timeout=60)  # the CLI with the token, as users run it
    assert status.returncode == 0 and f"Job '{job_id}' succeeded" in status.stdout + status.stderr, status.stdout[-1000:]
    assert r.returncode == 0, logs
    assert "nightly dt=2026-11-22: OK" in r.stdout + r.stderr, logs

    summary = json.loads(storage.read_text(f"{out}/nightly/dt=2026-11-22/summary.json", endpoint=moto_endpoint))
    assert summary["ok"] and set(summary["steps"]) == {"items", "sequences"}
    items = summary["steps"]["items"]["summary"]
    catalog_rows = storage.read_parquet(f"{dataset}/catalog.parquet", endpoint=moto_endpoint).num_rows
    assert items["mode"] == "incremental" and items["ok"] + items["failed"] == catalog_rows == 40
    # the published Parquet, read with plain pyarrow on the S3 filesystem
    fs, path = storage.pyarrow_filesystem(f"{out}/items/dt=2026-11-22", endpoint=moto_endpoint)
    table = pq.read_table(path, filesystem=fs)
    assert table.num_rows == items["ok"] == 40
    assert {"item_id", "emb_text", "emb_image", "emb_fused", "content_hash", "model_version"} <= set(table.column_names)
    assert set(table.column("model_version").to_pylist()) == {"tiny-v1"}
    seq = summary["steps"]["sequences"]["summary"]
    test_users = storage.read_parquet(f"{dataset}/splits/test.parquet", endpoint=moto_endpoint).num_rows
    assert seq["ok"] + seq["failed"] == test_users and seq["ok"] > 0
