"""Reliability and security of the embed job against real components (issue 9): local Ray, a moto S3 server
behind the fault-injecting proxy, the tiny offline Qwen2.5-VL, ``jobs/embed_items.py`` in a subprocess.

- object storage faults (500/503, dropped connections, slow answers) on every S3 request of the run: every row
  written exactly once; every boto3 fault met by one of the project's (counted) clients; the job's Ray metric
  never above one retry per such fault (pyarrow's S3 client, which Ray Data reads through, is not counted) and
  at least three quarters of them (a lower bound; see :func:`_check_retries_counted`); the summary's
  ``storage_retries`` within that;
- a model actor killed mid-run (``inject_actor_exit_after_batches``): restarted by Ray Data, batch retried,
  no row missing or duplicated;
- the driver SIGKILLed mid-run: nothing published, the same-day re-run publishes a complete snapshot;
- hostile rows (corrupt/truncated/empty/bomb/text images, image outside ``allowed_roots``, odd titles) through
  the real items pipeline: every row embedded or in the errors table with a reason;
- secure defaults: rows pointing outside the dataset (a local file, http://127.0.0.1, a redirect) are
  ``outside_root`` error rows and nothing is opened or requested;
- bad catalogs (missing column, duplicate ids) and bad config values: errors naming the column / id / field;
- Ray and the test servers listen on loopback only.

Unit-level coverage this builds on (not repeated here): decode reasons and bombs in
``tests/unit/data/test_images.py``, ``prepare_items`` reasons in ``tests/unit/embed/test_preprocess.py``,
config messages in ``tests/unit/test_config.py``.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.faults import FaultPlan, FaultProxy, RecordingServer
from vlm2rec_ray import storage
from vlm2rec_ray.config import ConfigError, EmbedJobConfig, load_config
from vlm2rec_ray.storage.retries import retries_since

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
N = 40  # synthetic items per catalog
DT = "2026-11-23"


def _cfg(model: Path, *extra: str) -> EmbedJobConfig:
    return load_config(EmbedJobConfig, None, [
        f"model.name={model}", "model.min_pixels=3136", "model.max_pixels=3136", "model_version=v1",
        "progress=false", "batch_size=8", "preprocess_batch_size=16", f"dt={DT}", *extra])


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small synthetic dataset on local disk (catalog.parquet + images/), shared by the module."""
    from vlm2rec_ray.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("reliability") / "ds"
    generate_synthetic(str(root), num_items=N, num_users=4, seed=0, image_size=32)
    return root


def _ids(t: pa.Table) -> list[str]:
    return sorted(t.column("item_id").to_pylist())


def _settled_job_retries(timeout_s: float = 30.0) -> dict[str, int]:
    """The job's S3 retries by process once every worker's last export reached the metrics agents (stable 3 s)."""
    from vlm2rec_ray.storage.retries import job_retries

    last, since, deadline = None, time.time(), time.time() + timeout_s
    while time.time() < deadline:
        now = job_retries()
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= 3:
            break
        time.sleep(0.5)
    assert last is not None, "no metrics endpoint answered"
    return last


def _check_retries_counted(plan: FaultPlan, counted: int) -> None:
    """What the job's retry figure guarantees (vlm2rec_ray.storage.retries). Every fault the proxy gave a
    boto3 client went to one of the project's clients (``storage.s3_client``: they tag their User-Agent with
    the pid), which retried it once and counted it in its process (exactly: the unit test of the hook,
    tests/unit/data/test_storage_s3_io.py). The figure adds up what the processes exported: never more than the
    faults, and a lower bound. Ray ships a worker's increments to the node's agent as deltas, and a report that
    does not arrive is lost: a worker stopped right after its last retry, or a busy box (fresh-clone CI under
    load counted 11, and once 5, of 12 faults of which 11 were in a worker still alive; on a quiet box 12 of 12
    every time). So the test checks that the figure travels (at least one) and never over-counts."""
    import psutil

    boto3_faults = plan.faults_by_client["boto3"]
    alive = {pid: n for pid, n in plan.faults_by_pid.items() if psutil.pid_exists(pid)}
    print(f"boto3 faults by pid {plan.faults_by_pid} (this process: {os.getpid()}), of processes still alive "
          f"{alive}; counted {counted}")
    assert sum(plan.faults_by_pid.values()) == boto3_faults, plan  # only the project's clients met them
    assert boto3_faults >= 3 and 1 <= counted <= boto3_faults, (counted, alive, plan)


def test_storage_faults_every_row_once_and_retries_counted(moto_endpoint: str, ray_local: Any,
                                                           tiny_backbone_dir: Path) -> None:
    from vlm2rec_ray.data.synthetic import generate_synthetic
    from vlm2rec_ray.embed import format_summary, read_embeddings, run_embed_items

    bucket = f"faults-{uuid.uuid4().hex[:10]}"
    storage.s3_client(moto_endpoint).create_bucket(Bucket=bucket)
    generate_synthetic(f"s3://{bucket}/ds", num_items=N, num_users=4, seed=1, image_size=32)
    catalog_ids = sorted(storage.read_parquet(f"s3://{bucket}/ds/catalog.parquet").column("item_id").to_pylist())
    storage.upload_dir(tiny_backbone_dir, f"s3://{bucket}/model", endpoint=moto_endpoint)
    plan = FaultPlan(error_rate=0.15, drop_rate=0.03, slow_rate=0.03, slow_s=0.1, seed=3)
    before = _settled_job_retries()
    with FaultProxy(moto_endpoint, plan) as proxy:
        # Everything of the run goes through the proxy: the model's config (driver) and weights (actor), catalog
        # read (Ray Data, pyarrow), census, image GETs, Parquet uploads, manifest.
        s = run_embed_items(_cfg(tiny_backbone_dir, f"model.name=s3://{bucket}/model", f"dataset_uri=s3://{bucket}/ds",
                                 f"output_uri=s3://{bucket}/emb", f"storage.endpoint_url={proxy.url}"))
    counted = retries_since(before, _settled_job_retries())
    text = format_summary(s)
    print(f"\nfault proxy: {plan.counts}, by client {plan.faults_by_client}; job metric {counted}, summary "
          f"storage_retries={s['storage_retries']}\n{text}")
    assert plan.counts["error"] + plan.counts["drop"] >= 5, plan.counts  # the faults really happened
    assert s["input_rows"] == N and s["ok"] == N and s["failed"] == 0, s
    # The project's boto3 clients retry each injected fault once (the proxy fails a request before forwarding it,
    # so a retry never repeats work; a request out of retries would have failed the run) and count it where it
    # happens: the driver, the model actor's download, the fetch and write tasks. The Ray metric adds them up
    # across the job; the summary read it at the end of the run, before the last exports.
    _check_retries_counted(plan, counted)
    assert s["storage_retries"] is not None and 1 <= s["storage_retries"] <= counted
    assert f"about {s['storage_retries']} S3 retries" in text
    t = read_embeddings(f"s3://{bucket}/emb/items", endpoint=moto_endpoint)  # read back without the proxy
    assert t.num_rows == N and _ids(t) == catalog_ids  # every row exactly once


def test_incremental_run_under_storage_faults_counts_every_retry(moto_endpoint: str, ray_local: Any,
                                                                 tiny_backbone_dir: Path) -> None:
    """The nightly path through the proxy: previous manifest and index, scan staging, the three pass-2 reads
    (staged new/changed and failed rows, the previous snapshot's files), staging clean-up."""
    from vlm2rec_ray.data.synthetic import generate_synthetic
    from vlm2rec_ray.embed import read_embeddings, run_embed_items

    bucket = f"faults-{uuid.uuid4().hex[:10]}"
    storage.s3_client(moto_endpoint).create_bucket(Bucket=bucket)
    ds, out = f"s3://{bucket}/ds", f"s3://{bucket}/emb"
    generate_synthetic(ds, num_items=N, num_users=4, seed=2, image_size=32)
    first = run_embed_items(_cfg(tiny_backbone_dir, f"dataset_uri={ds}", f"output_uri={out}"))  # no faults
    cat = storage.read_parquet(f"{ds}/catalog.parquet")
    titles = cat.column("title").to_pylist()
    titles[1] = "a changed title"
    uris = cat.column("image_uri").to_pylist()
    uris[2] = "images/not-there.png"  # fails: a row for the errors table
    v2 = cat.set_column(1, "title", pa.array(titles)).set_column(2, "image_uri", pa.array(uris)).slice(0, N - 1)
    storage.write_parquet(v2, f"{ds}/catalog_v2.parquet")  # ... and the last item deleted
    plan = FaultPlan(error_rate=0.15, drop_rate=0.03, slow_rate=0.0, seed=7)
    before = _settled_job_retries()
    with FaultProxy(moto_endpoint, plan) as proxy:
        s = run_embed_items(_cfg(tiny_backbone_dir, f"catalog_uri={ds}/catalog_v2.parquet", f"output_uri={out}",
                                 "dt=2026-11-24", "incremental=true", f"storage.endpoint_url={proxy.url}"))
    counted = retries_since(before, _settled_job_retries())
    print(f"\nfault proxy: {plan.counts}, by client {plan.faults_by_client}; job metric {counted}, summary "
          f"storage_retries={s['storage_retries']}; new={s['new']} changed={s['changed']} unchanged={s['unchanged']} "
          f"deleted={s['deleted']} failed={s['failed']}")
    assert first["ok"] == N and plan.counts["error"] + plan.counts["drop"] >= 5, plan.counts
    assert (s["changed"], s["unchanged"], s["deleted"], s["failed"]) == (1, N - 3, 1, 1), s
    _check_retries_counted(plan, counted)
    assert s["storage_retries"] is not None and s["storage_retries"] <= counted, (s, counted)
    t = read_embeddings(f"{out}/items", endpoint=moto_endpoint)
    assert t.num_rows == N - 2 and len(set(t.column("item_id").to_pylist())) == N - 2
    assert not storage.list_uris(f"{out}/items/dt=2026-11-24/run={s['run_id']}/_staging", endpoint=moto_endpoint)


def test_model_actor_killed_mid_run(local_ds: Path, ray_local: Any, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    from vlm2rec_ray.embed import read_embeddings, run_embed_items

    out = tmp_path / "out"
    s = run_embed_items(_cfg(tiny_backbone_dir, f"dataset_uri={local_ds}", f"output_uri={out}", "batch_size=4",
                             "inject_actor_exit_after_batches=2"))
    marker = Path(tempfile.gettempdir()) / f"vlm2rec-embed-exit-{s['run_id']}"
    assert marker.exists(), "the model actor did not exit: the injection did not fire"
    marker.unlink()
    assert s["ok"] == N and s["failed"] == 0, s
    t = read_embeddings(str(out / "items"))
    catalog = pq.read_table(local_ds / "catalog.parquet")
    assert t.num_rows == N and _ids(t) == _ids(catalog)  # nothing missing, nothing twice
    assert pq.read_table(out / "items" / f"dt={DT}").num_rows == N  # plain pyarrow over the partition agrees


def test_driver_killed_then_same_day_rerun(local_ds: Path, ray_local: Any, tiny_backbone_dir: Path,
                                           tmp_path: Path) -> None:
    """``jobs/embed_items.py`` (a separate driver joined to the test's Ray instance) is SIGKILLed once it has
    written part files; nothing is published; the same-day re-run publishes one complete snapshot."""
    import ray

    from vlm2rec_ray.embed import read_embeddings, run_embed_items

    out = tmp_path / "out"
    part = out / "items" / f"dt={DT}"
    args = [f"model.name={tiny_backbone_dir}", "model.min_pixels=3136", "model.max_pixels=3136",
            "model_version=v1", "progress=false", f"dt={DT}", f"dataset_uri={local_ds}", f"output_uri={out}",
            "batch_size=2", "preprocess_batch_size=4", "rows_per_file=4"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    log = tmp_path / "killed_driver.log"  # a file, not a pipe: a full pipe would stall the driver
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "embed_items.py"), *args], env=env,
                                stdout=fh, stderr=subprocess.STDOUT)
    parts: list[Path] = []
    try:
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            parts = [p for p in part.glob("run=*/part-*.parquet") if p.stat().st_size > 0]
            if parts:
                break
            time.sleep(0.05)
        assert parts, f"no output part appeared (rc={proc.poll()})"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, log.read_text(errors="replace")[-2000:]
    assert not (part / "_manifest.json").exists()
    with pytest.raises(FileNotFoundError):
        read_embeddings(str(out / "items"))  # the partial run is invisible
    killed_runs = {p.parent.name for p in part.glob("run=*/part-*.parquet")}
    print(f"\nkilled driver left {len(parts)}+ part file(s) in {sorted(killed_runs)}")

    s = run_embed_items(_cfg(tiny_backbone_dir, f"dataset_uri={local_ds}", f"output_uri={out}", "rows_per_file=4"))
    assert s["ok"] == N and s["failed"] == 0
    t = read_embeddings(str(out / "items"))
    assert t.num_rows == N and _ids(t) == _ids(pq.read_table(local_ds / "catalog.parquet"))
    assert f"run={s['run_id']}" not in killed_runs
    left = {p.parent.name for p in part.glob("run=*/part-*.parquet")} - {f"run={s['run_id']}"}
    # A reader that follows the manifest sees the new run only; a plain directory scan sees what is left over.
    print(f"after the re-run, unpublished run dirs still on disk: {sorted(left)}")
    assert not left, f"the killed run's files are still in the partition: {sorted(left)}"


def _bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels: a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_hostile_rows_embedded_or_errors_with_reason(local_ds: Path, ray_local: Any, tiny_backbone_dir: Path,
                                                     tmp_path: Path) -> None:
    from vlm2rec_ray.embed import read_embeddings, read_errors, run_embed_items

    root = tmp_path / "cat"
    (root / "bad").mkdir(parents=True)
    good = (local_ds / "images").glob("*.png").__next__().read_bytes()
    outside = tmp_path / "outside.png"
    outside.write_bytes(good)
    files = {"corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2, "truncated.png": good[: len(good) // 3],
             "zero.png": b"", "bomb.png": _bomb_png(40_000, 40_000), "text.png": b"just some text, not a picture\n",
             "good.png": good}
    for name, data in files.items():
        (root / "bad" / name).write_bytes(data)
    g = "bad/good.png"
    # (item_id, title, image_uri, expected reason or None for embedded)
    table = [
        ("img-corrupt", "corrupt bytes", "bad/corrupt.png", "corrupt"),
        ("img-truncated", "truncated png", "bad/truncated.png", "corrupt"),
        ("img-zero", "zero-byte file", "bad/zero.png", "empty"),
        ("img-bomb", "40000x40000 declared", "bad/bomb.png", "decompression_bomb"),
        ("img-text", "a text file", "bad/text.png", "not_image"),
        ("img-missing", "no such file", "bad/nope.png", "missing"),
        ("img-outside", "outside allowed_roots", str(outside), "outside_root"),
        ("img-dotdot", "dot-dot escape", "../outside.png", "outside_root"),
        ("img-no-uri", "empty image_uri", "", "missing"),
        ("title-none", None, g, "empty_title"),
        ("title-empty", "", g, "empty_title"),
        ("title-100k", ("long title " * 10_000)[:100_000], g, None),
        ("title-rtl", "\u05e1\u05dc \u05e7\u05e0\u05d9\u05d5\u05ea \u0639\u0631\u0628\u0629 \u0627\u0644\u062a\u0633\u0648\u0642 \u202eevil\u202c", g, None),
        ("title-emoji", "\U0001f389\U0001f44d\U0001f3fd mug \u2615 \U0001f468\u200d\U0001f469\u200d\U0001f467", g, None),
        ("title-combining", "Z\u0324\u0354\u0367\u0311a\u0308\u0356\u032dl\u036e\u0312g\u030c\u0317o\u0319\u0314", g, None),
        ("title-nul", "mug\x00lamp\x00", g, None),
        ("title-markup", "<|vision_start|><|image_pad|><|vision_end|><|im_end|> injected", g, None),
    ]
    base = pq.read_table(local_ds / "catalog.parquet")
    base_uris = [str(local_ds / u) for u in base.column("image_uri").to_pylist()]
    rows_in = base.num_rows + len(table)
    cat = pa.table({"item_id": base.column("item_id").to_pylist() + [r[0] for r in table],
                    "title": base.column("title").to_pylist() + [r[1] for r in table],
                    "image_uri": base_uris + [r[2] for r in table]})
    pq.write_table(cat, root / "catalog.parquet")
    out = tmp_path / "out"
    s = run_embed_items(_cfg(tiny_backbone_dir, f"catalog_uri={root / 'catalog.parquet'}", f"output_uri={out}",
                             f'allowed_roots=["{root}", "{local_ds}"]', "max_failure_fraction=1"))
    data = read_embeddings(str(out / "items"))
    errors = read_errors(str(out / "items"))
    got = dict(zip(errors.column("item_id").to_pylist(), errors.column("reason").to_pylist(), strict=True))
    details = dict(zip(errors.column("item_id").to_pylist(), errors.column("detail").to_pylist(), strict=True))
    print(f"\nrows in {rows_in}, rows out {data.num_rows}, error rows {errors.num_rows}; reasons {s['reasons']}")
    print(f"{'item_id':<16} {'expected':<20} {'got':<20} detail")
    for item_id, _, _, want in table:
        print(f"{item_id:<16} {want or 'embedded':<20} {got.get(item_id, 'embedded'):<20} "
              f"{(details.get(item_id) or '')[:70]!r}")
    assert data.num_rows + errors.num_rows == rows_in == s["input_rows"]
    assert sorted(data.column("item_id").to_pylist() + list(got)) == sorted(cat.column("item_id").to_pylist())
    assert got == {r[0]: r[3] for r in table if r[3] is not None}
    assert all(details[k] for k in got)  # every error row says why
    assert s["failed"] == len(got) and sum(s["reasons"].values()) == len(got)
    for k in ("title-100k", "title-rtl", "title-emoji", "title-combining", "title-nul", "title-markup"):
        assert k in set(data.column("item_id").to_pylist())


def test_rows_outside_the_dataset_are_errors_and_never_read(local_ds: Path, ray_local: Any, tiny_backbone_dir: Path,
                                                            tmp_path: Path) -> None:
    """Default roots: a row pointing at a local file outside the catalog's dataset, at http://127.0.0.1:<port>/ or
    at a redirect to it is an ``outside_root`` error row, and nothing is opened or requested. With http allowed
    for one origin, a redirect from it to another host is still refused before the other host sees a request."""
    import threading

    from vlm2rec_ray.embed import read_embeddings, read_errors, run_embed_items

    good = next((local_ds / "images").glob("*.png")).read_bytes()
    target = RecordingServer(body=good)  # the "internal" host a row or a redirect points at
    hop = RecordingServer(redirect_to=f"{target.url}/secret.png", body=good)
    fifo = tmp_path / "outside" / "secret.png"  # outside the dataset: opening it for reading would unblock `opened`
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    opened = threading.Event()
    threading.Thread(target=lambda: (open(fifo, "wb").close(), opened.set()), daemon=True).start()
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "images" / "ok.png").write_bytes(good)
    ids = ["ok", "local-outside", "http-loopback", "http-redirect"]
    uris = ["images/ok.png", str(fifo), f"{target.url}/secret.png", f"{hop.url}/r"]
    pq.write_table(pa.table({"item_id": ids, "title": [f"title {i}" for i in ids], "image_uri": uris}),
                   root / "catalog.parquet")
    try:
        s = run_embed_items(_cfg(tiny_backbone_dir, f"dataset_uri={root}", f"output_uri={tmp_path / 'o1'}",
                                 "max_failure_fraction=1"))
        errors = read_errors(str(tmp_path / "o1" / "items"))
        reasons = dict(zip(errors.column("item_id").to_pylist(), errors.column("reason").to_pylist(), strict=True))
        print(f"\ndefault roots: {reasons}; requests hop={hop.requests} target={target.requests}; "
              f"fifo opened={opened.is_set()}")
        assert s["ok"] == 1 and read_embeddings(str(tmp_path / "o1" / "items")).column("item_id").to_pylist() == ["ok"]
        assert reasons == {"local-outside": "outside_root", "http-loopback": "outside_root",
                           "http-redirect": "outside_root"}
        assert hop.requests == [] and target.requests == [] and not opened.is_set()  # nothing was read

        # http allowed for the hop's origin only (and loopback let through, as an on-prem mirror would need):
        # its images are fetched, its redirect to another host is not followed.
        pq.write_table(pa.table({"item_id": ["mirror", "redirect"], "title": ["a", "b"],
                                 "image_uri": [f"{hop.url}/img.png", f"{hop.url}/r"]}), root / "catalog.parquet")
        s = run_embed_items(_cfg(tiny_backbone_dir, f"dataset_uri={root}", f"output_uri={tmp_path / 'o2'}",
                                 "max_failure_fraction=1", f'storage.allowed_roots=["{root}", "{hop.url}/"]',
                                 "storage.allow_private_addresses=true"))
        errors = read_errors(str(tmp_path / "o2" / "items"))
        assert s["ok"] == 1 and errors.column("item_id").to_pylist() == ["redirect"]
        assert errors.column("reason").to_pylist() == ["outside_root"]
        assert sorted(hop.requests) == ["/img.png", "/r"] and target.requests == []
    finally:
        hop.close()
        target.close()
        if not opened.is_set():  # release the writer thread
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))


def test_bad_catalogs_name_the_column_and_the_id(local_ds: Path, ray_local: Any, tiny_backbone_dir: Path,
                                                 tmp_path: Path) -> None:
    from vlm2rec_ray.embed import run_embed_items

    base = pq.read_table(local_ds / "catalog.parquet").slice(0, 8)
    base = base.set_column(2, "image_uri", pa.array([str(local_ds / u) for u in base.column("image_uri").to_pylist()]))
    no_col = tmp_path / "no_col.parquet"
    pq.write_table(base.drop_columns(["image_uri"]), no_col)
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['image_uri'\]") as e1:
        run_embed_items(_cfg(tiny_backbone_dir, f"catalog_uri={no_col}", f"output_uri={tmp_path / 'o1'}"))
    dup_id = base.column("item_id")[3].as_py()
    dup = tmp_path / "dup.parquet"
    pq.write_table(pa.concat_tables([base, base.slice(3, 1)]), dup)
    with pytest.raises(ValueError, match=rf"1 duplicate item_id value\(s\), e\.g\. \['{dup_id}'\].*nothing was "
                       "embedded") as e2:
        run_embed_items(_cfg(tiny_backbone_dir, f"catalog_uri={dup}", f"output_uri={tmp_path / 'o2'}"))
    print(f"\nmissing column: {e1.value}\nduplicate id: {e2.value}")
    assert not (tmp_path / "o2").exists()  # refused before the pipeline started: nothing written at all


@pytest.mark.parametrize(("override", "expect"), [
    ("batch_size=0", r"batch_size: .*greater than or equal to 1 \(got 0\)"),
    ("max_failure_fraction=1.5", r"max_failure_fraction: .*less than or equal to 1 \(got 1.5\)"),
    ("dt=2026-13-01", r"dt='2026-13-01' is not a date YYYY-MM-DD; write e.g. dt=2026-11-22"),
    ('allowed_roots=["s3://b/img/", " "]', r"allowed_roots=.* holds an empty entry; list prefixes like"),
    ("gpus_per_actor=1.5", r"gpus_per_actor=1.5 is not valid: .*set e.g. gpus_per_actor=0.5, 1 or 2"),
    ("output_uri=s3://x/emb", r"output_uri='s3://x/emb' is not a valid location \(invalid S3 bucket .*\); write e.g. output_uri=s3://"),
    ("max_title_chars=0", r"max_title_chars: .*greater than or equal to 1 \(got 0\)"),
    ("inject_actor_exit_after_batches=0", r"inject_actor_exit_after_batches: .*greater than or equal to 1"),
])
def test_invalid_config_names_field_value_and_fix(override: str, expect: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=expect):
        _cfg(tmp_path, f"dataset_uri={tmp_path}", f"output_uri={tmp_path}", override)


def test_invalid_date_in_yaml_file_is_a_config_error(tmp_path: Path) -> None:
    y = tmp_path / "embed.yaml"
    y.write_text(f"model:\n  name: m\nmodel_version: v1\noutput_uri: out\ndataset_uri: {tmp_path}\ndt: 2026-13-01\n")
    with pytest.raises(ConfigError, match=r"embed.yaml' holds a value YAML cannot read \(month must be in 1..12\)"):
        load_config(EmbedJobConfig, y)


def test_ray_and_test_servers_listen_on_loopback(ray_local: Any, moto_endpoint: str) -> None:
    import ipaddress

    import psutil
    import ray

    ctx = ray.get_runtime_context()
    node_ips = {n["NodeManagerAddress"] for n in ray.nodes()}
    dashboard = ray._private.worker.get_dashboard_url()
    gcs_host = ctx.gcs_address.rsplit(":", 1)[0]
    print(f"\nnode IPs {node_ips}, GCS {ctx.gcs_address}, dashboard {dashboard}, moto {moto_endpoint}")
    assert node_ips == {"127.0.0.1"} and gcs_host == "127.0.0.1"
    assert dashboard.split("://")[-1].startswith("127.0.0.1:")
    assert moto_endpoint.startswith("http://127.0.0.1:")
    with FaultProxy(moto_endpoint, FaultPlan()) as proxy:
        assert proxy.url.startswith("http://127.0.0.1:")
    # Every listening socket of this process tree (Ray's GCS, raylet, dashboard, agents, workers; moto) is on
    # loopback.
    me = psutil.Process()
    exposed = []
    for p in [me, *me.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            ip = ipaddress.ip_address(c.laddr.ip)
            ip = getattr(ip, "ipv4_mapped", None) or ip  # '::ffff:127.0.0.1' is IPv4 loopback
            if c.status == psutil.CONN_LISTEN and not ip.is_loopback:
                exposed.append((p.name(), " ".join(p.cmdline()[:2])[:80], f"{c.laddr.ip}:{c.laddr.port}"))
    assert not exposed, f"listening beyond loopback: {exposed}"
