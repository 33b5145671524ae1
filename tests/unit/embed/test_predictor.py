"""The model stage on the tiny Qwen2.5-VL: dedup, cache, sink rows, error isolation, and determinism.

Determinism: Ray Data does not fix which rows share a batch. With ``deterministic=True`` every row's
embedding is bitwise equal whatever its batch neighbours, batch size or order (and equal to the row encoded
alone); plain left-padded batches only agree within ~1e-5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from tests.unit.embed.helpers import item_opts, write_catalog
from vlm2rec_ray.embed import preprocess as pre
from vlm2rec_ray.embed.predictor import BatchEncoder
from vlm2rec_ray.embed.schema import row_schema
from vlm2rec_ray.model.backbone import load_backbone
from vlm2rec_ray.model.encoder import VLM2RecEncoder


@pytest.fixture(scope="module")
def encoder(tiny_backbone_dir: Path) -> VLM2RecEncoder:
    torch.set_num_threads(1)
    model, processor = load_backbone(str(tiny_backbone_dir))
    return VLM2RecEncoder(model, processor)


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    """24 encode rows (titles of 1-4 words, images 40-200 px) plus a duplicate title/image and a failed row."""
    root = tmp_path_factory.mktemp("catalog")
    cat = write_catalog(root, n=24, seed=3)
    import pyarrow.parquet as pq

    t = pq.read_table(cat)
    extra = pa.table({"item_id": ["same-image", "same-title", "broken"],
                      "title": ["unique words here", t.column("title")[5].as_py(), "x"],
                      "image_uri": ["images/0.png", "images/7.png", "images/missing.png"]})
    return pre.prepare_items(pa.concat_tables([t, extra]), opts=item_opts(str(cat)))


def _emb(out: pa.Table) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) for k, v in zip(out.column("key").to_pylist(),
                                                         out.column("emb_fused").to_pylist(), strict=True) if v is not None}


def test_sink_rows_dedup_and_failures(encoder: VLM2RecEncoder, rows: pa.Table) -> None:
    core = BatchEncoder(encoder, batch_size=8)
    out = core.embed_table(rows)
    assert out.schema == row_schema(64) and out.num_rows == rows.num_rows
    status = dict(zip(out.column("key").to_pylist(), out.column("status").to_pylist(), strict=True))
    assert status.pop("broken") == "failed" and set(status.values()) == {"encoded"}
    ok = rows.filter(pa.compute.equal(rows.column("status"), "encode"))
    # Each distinct title and image went through the model exactly once.
    n_texts, n_images = len(set(ok.column("text_key").to_pylist())), len(set(ok.column("image_key").to_pylist()))
    assert n_texts < ok.num_rows and n_images == ok.num_rows - 2  # same-image/same-title reuse images 0 and 7
    assert sum(out.column("texts_encoded").to_pylist()) == n_texts
    assert sum(out.column("images_encoded").to_pylist()) == n_images
    d = {r["key"]: r for r in out.to_pylist()}
    assert d["same-image"]["emb_image"] == d["item000"]["emb_image"]
    assert d["same-title"]["emb_text"] == d["item005"]["emb_text"]
    e_t, e_v, e_f = (np.asarray(d["item003"][c], np.float32) for c in ("emb_text", "emb_image", "emb_fused"))
    assert np.array_equal(e_f, e_t + e_v)  # external fusion: the element-wise sum
    assert d["broken"]["emb_fused"] is None and d["broken"]["reason"] == "missing"
    assert d["item003"]["title"] is None  # ok rows carry ids + embeddings + small metadata only
    # Across calls the actor's cache serves repeated content: nothing is encoded again.
    again = core.embed_table(rows)
    assert sum(again.column("texts_encoded").to_pylist()) == sum(again.column("images_encoded").to_pylist()) == 0
    assert _emb(again).keys() == _emb(out).keys() and all(np.array_equal(_emb(again)[k], _emb(out)[k]) for k in _emb(out))


def test_matches_the_encoder(encoder: VLM2RecEncoder, rows: pa.Table) -> None:
    """The row embedding is the encoder's P_T / P_V item embedding (paper 2.2)."""
    from PIL import Image

    out = BatchEncoder(encoder, batch_size=32, cache_mib=0).embed_table(rows.slice(0, 4))
    r = rows.slice(0, 4).to_pylist()
    images = [Image.frombytes("RGB", (x["widths"][0], x["heights"][0]), x["pixels"][0]) for x in r]
    with torch.inference_mode():
        e_t, e_v = encoder.encode_items([x["titles"][0] for x in r], images)
    got_t = np.stack(out.column("emb_text").to_numpy(zero_copy_only=False))
    got_v = np.stack(out.column("emb_image").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got_t, e_t.numpy(), atol=1e-5)
    np.testing.assert_allclose(got_v, e_v.numpy(), atol=1e-5)


def test_bitwise_deterministic_whatever_the_batch(encoder: VLM2RecEncoder, rows: pa.Table) -> None:
    ok = rows.filter(pa.compute.equal(rows.column("status"), "encode"))
    ref = _emb(BatchEncoder(encoder, batch_size=1, cache_mib=0).embed_table(ok))  # every row alone
    rng = np.random.default_rng(0)
    for batch_size, call_rows in ((3, 5), (8, 11), (32, 64)):
        perm = pa.array(rng.permutation(ok.num_rows))
        shuffled = ok.take(perm)
        core = BatchEncoder(encoder, batch_size=batch_size, cache_mib=0)
        got: dict[str, np.ndarray] = {}
        for s in range(0, shuffled.num_rows, call_rows):
            got.update(_emb(core.embed_table(shuffled.slice(s, call_rows))))
        assert got.keys() == ref.keys()
        diff = [k for k in ref if not np.array_equal(got[k], ref[k])]
        assert not diff, f"batch_size={batch_size}: {len(diff)} rows differ bitwise"
    # Plain left-padded batches agree only approximately.
    loose = _emb(BatchEncoder(encoder, batch_size=32, deterministic=False, cache_mib=0).embed_table(ok))
    assert max(float(np.abs(loose[k] - ref[k]).max()) for k in ref) < 1e-4


def test_a_failing_row_fails_alone(encoder: VLM2RecEncoder, rows: pa.Table, monkeypatch: pytest.MonkeyPatch) -> None:
    ok = rows.filter(pa.compute.equal(rows.column("status"), "encode")).slice(0, 6)
    poisoned = ok.column("titles")[2].as_py()
    real = encoder.encode_text_sequences

    def flaky(titles):  # type: ignore[no-untyped-def]
        if any(t == poisoned for t in titles):
            raise RuntimeError("CUDA error: device-side assert (simulated)")
        return real(titles)

    monkeypatch.setattr(encoder, "encode_text_sequences", flaky)
    out = BatchEncoder(encoder, batch_size=6, cache_mib=0, deterministic=False).embed_table(ok)
    status = out.column("status").to_pylist()
    assert status.count("failed") == 1 and status[2] == "failed"
    assert out.column("reason")[2].as_py() == "encode_error" and "device-side assert" in out.column("detail")[2].as_py()


def test_internal_fusion_uses_the_interleaved_prompt(encoder: VLM2RecEncoder, rows: pa.Table) -> None:
    from PIL import Image

    sub = rows.slice(0, 3)
    out = BatchEncoder(encoder, batch_size=4, fusion="internal", cache_mib=0).embed_table(sub)
    r = sub.to_pylist()
    with torch.inference_mode():
        z = encoder.encode_interleaved([x["titles"] for x in r],
                                       [[Image.frombytes("RGB", (x["widths"][0], x["heights"][0]), x["pixels"][0])]
                                        for x in r])
    got = np.stack(out.column("emb_fused").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, z.numpy(), atol=1e-5)
    e_sum = np.stack(out.column("emb_text").to_numpy(zero_copy_only=False)) + np.stack(
        out.column("emb_image").to_numpy(zero_copy_only=False))
    assert not np.allclose(got, e_sum)


def test_cache_holds_only_the_embeddings(encoder: VLM2RecEncoder, rows: pa.Table) -> None:
    """The cache copies each vector into its own slab: nothing it keeps refers to a batch's hidden state, and
    what it serves equals what the batch returned."""
    core = BatchEncoder(encoder, batch_size=8)
    out = core.embed_table(rows)
    ok = [i for i, s in enumerate(out.column("status").to_pylist()) if s == "encoded"]
    assert ok and len(core.text_cache) and len(core.image_cache)
    for cache in (core.text_cache, core.image_cache):
        assert cache.slab is not None and cache.slab.base is None and cache.slab.flags.owndata
    emb_text = out.column("emb_text").to_pylist()
    for i in ok:
        cached = core.text_cache.get(rows.column("text_key")[i].as_py())
        assert cached is not None and np.array_equal(cached, np.asarray(emb_text[i], np.float32))


def test_lru_cache_evicts_least_recent_and_reuses_its_slab_row() -> None:
    from vlm2rec_ray.embed.predictor import _LRU

    c = _LRU(2, 3)
    c.put("a", np.full(3, 1, np.float32))
    c.put("b", np.full(3, 2, np.float32))
    got = c.get("a")  # "a" is now the most recent
    assert got is not None and got.tolist() == [1, 1, 1]
    got[:] = 9  # a copy: the cache is not changed through it
    c.put("c", np.full(3, 3, np.float32))  # evicts "b", takes its row
    assert c.get("b") is None and len(c) == 2
    assert c.get("a").tolist() == [1, 1, 1] and c.get("c").tolist() == [3, 3, 3]
    c.put("a", np.full(3, 4, np.float32))  # update in place
    assert c.get("a").tolist() == [4, 4, 4] and len(c) == 2
    off = _LRU(0, 3)
    off.put("a", np.ones(3, np.float32))
    assert off.get("a") is None and len(off) == 0


@pytest.mark.parametrize("dim", [64, 1024])
def test_cache_mib_bounds_the_caches_real_footprint(dim: int) -> None:
    """A full cache (slab, keys, LRU order), measured with tracemalloc, stays within cache_mib."""
    import hashlib
    import tracemalloc

    from vlm2rec_ray.embed.predictor import _ENTRY_OVERHEAD, _LRU

    cache_mib = 2
    entries = cache_mib * (1 << 20) // (4 * dim + _ENTRY_OVERHEAD)
    vec = np.ones(dim, np.float32)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        c = _LRU(entries, dim)
        for i in range(entries + 100):  # full, then evicting
            c.put(hashlib.sha256(str(i).encode()).hexdigest(), vec)  # 64-char keys, as text_key/image_key
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    print(f"\nd={dim}: {entries} entries use {used / 2**20:.2f} MiB of cache_mib={cache_mib} "
          f"({used / entries - 4 * dim:.0f} B per entry besides the floats)")
    assert len(c) == entries
    assert used <= cache_mib * (1 << 20)
    assert used >= 0.6 * cache_mib * (1 << 20)  # the budget is used, not wildly overestimated


def test_images_are_grouped_by_the_processors_resized_grid(encoder: VLM2RecEncoder) -> None:
    """Deterministic chunks group images by the grid the processor resizes them to (equal prompt lengths), not
    by raw size; a processor without Qwen's resize rule falls back to the raw size."""
    from vlm2rec_ray.embed.predictor import _image_grid_fn

    grid = _image_grid_fn(encoder.processor)
    assert grid(64, 64) == grid(60, 62) != (64, 64)  # two raw sizes, one grid
    assert grid(200, 100)[1] > grid(200, 100)[0]  # (height, width)
    assert _image_grid_fn(object())(30, 20) == (20, 30)
