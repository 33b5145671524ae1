"""The model stage: :class:`EmbedPredictor`, a Ray Data actor holding one copy of the model. Rows come back
``encoded`` with ``emb_text`` (titles through P_T), ``emb_image`` (images through P_V) and ``emb_fused``
(their sum, paper 2.3; the interleaved prompt's with ``model.fusion: internal``). Identical inputs are encoded
once (``text_key`` / ``image_key``, within a batch and in an LRU cache per actor of ``cache_mib``).

Determinism (CPU default): with left padding a row's result depends on its batch, so distinct prompts run as
unpadded sub-batches of one exact shape (token count; resized image grid) in a fixed order: every row is
bitwise equal to the row encoded alone. ``deterministic: false`` runs plain padded batches (GPU).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from vlm2rec_ray.embed.schema import fixed_size_list, rows

log = logging.getLogger(__name__)


# Bytes an LRU entry costs besides its d floats (key string, OrderedDict slot, slot number: 204-224 B measured
# in tests/unit/embed/test_predictor.py, plus headroom for the dict's resizing), so cache_mib bounds it all.
_ENTRY_OVERHEAD = 400


class _LRU:
    """An LRU map from content key to a ``d``-float32 vector, the vectors in one ``[capacity, d]`` slab allocated
    once (an array per vector interleaved with the batches' allocations: ~5 KB of private memory per item)."""

    def __init__(self, capacity: int, dim: int) -> None:
        self.capacity = max(0, int(capacity))
        self.slab = np.zeros((self.capacity, dim), np.float32) if self.capacity else None
        self.slots: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self.slots)

    def get(self, key: str) -> np.ndarray | None:
        """A copy of the cached vector (marked most recently used), or None."""
        slot = self.slots.get(key)
        if slot is None:
            return None
        self.slots.move_to_end(key)
        return self.slab[slot].copy()  # type: ignore[index]

    def put(self, key: str, value: np.ndarray) -> None:
        if not self.capacity:
            return
        slot = self.slots.get(key)
        if slot is None:  # the next free row, or the least recently used entry's (evicted)
            slot = self.slots[key] = len(self.slots) if len(self.slots) < self.capacity else self.slots.popitem(
                last=False)[1]
        self.slots.move_to_end(key)
        self.slab[slot] = value  # type: ignore[index]


def _image_grid_fn(processor: Any) -> Callable[[int, int], tuple[int, int]]:
    """``(width, height) -> the processor's resized (height, width)``: images with equal grids give prompts
    of equal length (falls back to the raw size, a finer but still exact grouping)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = processor.image_processor
        size, factor = dict(ip.size), int(ip.patch_size) * int(ip.merge_size)
        lo, hi = int(size["shortest_edge"]), int(size["longest_edge"])
        smart_resize(64, 64, factor=factor, min_pixels=lo, max_pixels=hi)
    except Exception:  # another processor family: group by raw size
        return lambda w, h: (h, w)
    return lambda w, h: tuple(smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi))


class BatchEncoder:
    """Deduplicating, shape-grouped encoding of histories (items are one-item histories) on a loaded
    :class:`~vlm2rec_ray.model.encoder.VLM2RecEncoder`. Usable without Ray (tests, the benchmark)."""

    def __init__(self, encoder: Any, *, batch_size: int, deterministic: bool = True, fusion: str = "external",
                 cache_mib: int = 256) -> None:
        import torch

        self.encoder, self.batch_size, self.deterministic, self.fusion = encoder, batch_size, deterministic, fusion
        self.dim = int(encoder.hidden_size)
        entries = int(cache_mib) * (1 << 20) // (4 * self.dim + _ENTRY_OVERHEAD)
        self.text_cache, self.image_cache, self.joint_cache = (_LRU(entries, self.dim) for _ in range(3))
        self._grid, self._torch = _image_grid_fn(encoder.processor), torch

    def _text_lengths(self, titles: Sequence[Sequence[str]], interleaved: bool = False) -> list[int]:
        from vlm2rec_ray.model import prompts

        proc, mh, mt = self.encoder.processor, self.encoder.max_history, self.encoder.max_title_chars
        prompt = prompts.interleaved_sequence_prompt if interleaved else prompts.text_sequence_prompt
        texts = [prompts.render_prompt(proc, prompt(list(t)[-mh:], max_title_chars=mt)) for t in titles]
        return [len(ids) for ids in proc.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _chunks(self, keys: list[str], shapes: list[Any] | None) -> list[list[int]]:
        """Index chunks to run as one forward each: with ``shapes`` (deterministic), by exact shape in key order."""
        groups: dict[Any, list[int]] = {}
        for i in range(len(keys)) if shapes is None else sorted(range(len(keys)), key=keys.__getitem__):
            groups.setdefault(None if shapes is None else shapes[i], []).append(i)
        return [idx[i:i + self.batch_size] for _, idx in sorted(groups.items(), key=lambda g: repr(g[0]))
                for i in range(0, len(idx), self.batch_size)]

    def _run(self, fn: Callable[[list[int]], Any], chunks: list[list[int]]) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        """Run ``fn`` per chunk; a chunk that raises is retried row by row so one bad row fails alone."""
        done: dict[int, np.ndarray] = {}
        errors: dict[int, str] = {}
        for chunk in chunks:
            try:
                out = fn(chunk)
                for i, row in zip(chunk, out, strict=True):
                    done[i] = row
            except Exception as e:
                if len(chunk) == 1:
                    errors[chunk[0]] = f"{type(e).__name__}: {e}"[:500]
                    continue
                log.warning("encode failed for a sub-batch of %d (%s); retrying row by row", len(chunk), e)
                sub_done, sub_err = self._run(fn, [[i] for i in chunk])
                done.update(sub_done)
                errors.update(sub_err)
        return done, errors

    def encode(self, titles: list[list[str]], images: list[list[Any]], text_keys: list[str], image_keys: list[str]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], list[int], dict[int, str]]:
        """Embed ``B`` histories.

        Returns:
            ``(emb_text, emb_image, emb_fused)`` each ``[B, d]`` float32 (rows of failed inputs are zeros),
            per-row counts of text and image forwards this call made on the row's behalf (0 = reused), and
            ``{row: error message}`` for rows the model failed on.
        """
        n, mh, enc = len(titles), self.encoder.max_history, self.encoder
        e_t, e_v, e_f = (np.zeros((n, self.dim), np.float32) for _ in range(3))
        n_text, n_image = [0] * n, [0] * n
        errors: dict[int, str] = {}

        def grids(idx: list[int]) -> list[Any]:
            return [tuple(self._grid(*im.size) for im in images[i][-mh:]) for i in idx]

        with self._torch.inference_mode():
            self._cached("text", self.text_cache, text_keys, lambda idx: self._text_lengths([titles[i] for i in idx]),
                         lambda idx: enc.encode_text_sequences([titles[i] for i in idx]), e_t, n_text, errors)
            self._cached("image", self.image_cache, image_keys, grids,
                         lambda idx: enc.encode_image_sequences([images[i] for i in idx]), e_v, n_image, errors)
            if self.fusion == "internal":  # the interleaved baseline: one joint prompt per row
                self._cached("interleaved", self.joint_cache, [f"{t}:{v}" for t, v in zip(text_keys, image_keys,
                                                                                          strict=True)],
                             lambda idx: list(zip(self._text_lengths([titles[i] for i in idx], interleaved=True),
                                                  grids(idx), strict=True)),
                             lambda idx: enc.encode_interleaved([titles[i] for i in idx], [images[i] for i in idx]),
                             e_f, None, errors, skip=set(errors))
            else:
                np.add(e_t, e_v, out=e_f)  # external fusion (paper 2.3): e = e_T + e_V
        return e_t, e_v, e_f, n_text, n_image, errors

    def _cached(self, which: str, cache: _LRU, keys: list[str], shapes: Callable[[list[int]], list[Any]],
                forward: Callable[[list[int]], Any], out: np.ndarray, counts: list[int] | None,
                errors: dict[int, str], skip: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        """``out[i]`` for every row: from ``cache``, or one forward per distinct key not cached (chunked by exact
        shape when deterministic); ``counts[i] = 1`` for the row whose forward it was."""
        fresh: dict[str, np.ndarray] = {}  # this call's results (the cache may be disabled or full)
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            if i not in skip and k not in first and cache.get(k) is None:
                first[k] = i
        todo = list(first.values())
        if todo:
            # a copy: on CPU ``.numpy()`` is a view of the batch's (B, T, d) hidden state, kept alive by any row
            done, errs = self._run(lambda c: np.array(forward([todo[j] for j in c]).detach().float().cpu().numpy(),
                                                      dtype=np.float32, copy=True),
                                   self._chunks([keys[i] for i in todo], shapes(todo) if self.deterministic else None))
            for j, vec in done.items():
                fresh[keys[todo[j]]] = vec  # a row of this chunk's (B, d) output, for this call only
                cache.put(keys[todo[j]], vec)  # copied into the cache's slab
                if counts is not None:
                    counts[todo[j]] = 1
            for j, msg in errs.items():
                errors.setdefault(todo[j], f"{which} encode failed: {msg}")
        for i, k in enumerate(keys):
            v = fresh.get(k)
            v = cache.get(k) if v is None else v
            if v is None:
                errors.setdefault(i, f"{which} encode failed for a row with the same input")
            else:
                out[i] = v

    def embed_table(self, batch: pa.Table) -> pa.Table:
        """Rows to encode (status ``encode``; ``failed`` rows pass through) -> ``encoded`` rows with the three
        embeddings (or ``failed`` with ``encode_error``); the pixels stay here."""
        n = batch.num_rows
        status, reason, detail = (batch.column(c).to_pylist() for c in ("status", "reason", "detail"))
        ok = [i for i, s in enumerate(status) if s == "encode"]
        n_text, n_image = [0] * n, [0] * n
        emb = np.zeros((3, n, self.dim), np.float32)
        if ok:
            titles = [batch.column("titles")[i].as_py() for i in ok]
            images = [[Image.frombytes("RGB", (int(w), int(h)), p) for p, w, h in zip(
                *(batch.column(c)[i].as_py() for c in ("pixels", "widths", "heights")), strict=True)] for i in ok]
            keys = [[batch.column(c)[i].as_py() for i in ok] for c in ("text_key", "image_key")]
            e_t, e_v, e_f, nt, ni, errors = self.encode(titles, images, *keys)
            for j, i in enumerate(ok):
                emb[:, i] = e_t[j], e_v[j], e_f[j]
                n_text[i], n_image[i] = nt[j], ni[j]
                if j in errors:
                    status[i], reason[i], detail[i] = "failed", "encode_error", errors[j]
                else:
                    status[i] = "encoded"
        valid = np.asarray([s == "encoded" for s in status])

        def fsl(m: np.ndarray) -> pa.Array:
            arr = fixed_size_list(m, self.dim)
            return pa.FixedSizeListArray.from_arrays(arr.values, type=arr.type, mask=pa.array(~valid))

        def pick(column: str | list[Any], ok: bool, other: Any = None) -> list[Any]:  # per row: the value if ok
            values = batch.column(column).to_pylist() if isinstance(column, str) else column
            return [x if v == ok else other for x, v in zip(values, valid, strict=True)]

        return rows(self.dim, n, key=batch.column("key"), history=batch.column("history"), emb_text=fsl(emb[0]),
                    emb_image=fsl(emb[1]), emb_fused=fsl(emb[2]), content_hash=pick("content_hash", True),
                    embedded_at=pick([_dt.datetime.now(_dt.timezone.utc)] * n, True), status=status,
                    change=pick("change", True, ""), in_prev=batch.column("in_prev"), reason=reason, detail=detail,
                    title=pick("title", False), image_uri=pick("image_uri", False),  # errors-table only
                    failed_item_id=batch.column("failed_item_id"), texts_encoded=n_text, images_encoded=n_image)


def load_encoder(cfg: Any, gpus: float = 0.0) -> Any:
    """Load the backbone + processor named by ``cfg.model`` into a :class:`VLM2RecEncoder` (eval mode).

    ``gpus > 1``: the backbone is sharded over the actor's GPUs with ``device_map="auto"`` (large backbones);
    otherwise it goes to ``cuda`` when visible, else CPU.
    """
    import torch

    from vlm2rec_ray.model.backbone import load_backbone
    from vlm2rec_ray.model.encoder import VLM2RecEncoder

    m = cfg.model
    sharded = gpus > 1 and torch.cuda.device_count() > 1
    backbone, processor = load_backbone(m.name, dtype=m.dtype, endpoint=cfg.storage.endpoint_url,
                                        attn_implementation=m.attn_implementation, min_pixels=m.min_pixels,
                                        max_pixels=m.max_pixels, device_map="auto" if sharded else None)
    return VLM2RecEncoder(backbone, processor, max_history=m.max_history,
                          max_title_chars=getattr(cfg, "max_title_chars", None))


class EmbedPredictor:
    """Ray Data actor UDF: ``map_batches(EmbedPredictor, fn_constructor_kwargs={"config": cfg.model_dump(),
    ...}, compute=ActorPoolStrategy(size=num_actors), num_gpus=gpus_per_actor)``."""

    def __init__(self, config: dict[str, Any], dim: int, gpus: float = 0.0, torch_threads: int | None = None,
                 deterministic: bool = True, run_id: str | None = None) -> None:
        import torch

        from vlm2rec_ray.config import EmbedJobConfig

        cfg = EmbedJobConfig.model_validate(config)
        self._exit_after, self._run_id, self._batches = cfg.inject_actor_exit_after_batches, run_id, 0  # testing
        if torch_threads:
            torch.set_num_threads(torch_threads)  # fixed thread count: part of CPU determinism
        encoder = load_encoder(cfg, gpus)
        if encoder.hidden_size != dim:
            raise ValueError(f"model {cfg.model.name!r} has hidden size {encoder.hidden_size}, but the run was "
                             f"planned for {dim}; the model changed under the job, re-run it")
        self.core = BatchEncoder(encoder, batch_size=cfg.batch_size, deterministic=deterministic,
                                 fusion=cfg.model.fusion, cache_mib=cfg.cache_mib)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self._exit_after is not None:
            self._maybe_exit()
        return self.core.embed_table(batch)

    def _maybe_exit(self) -> None:
        """Testing aid (``inject_actor_exit_after_batches``): before batch N+1 this actor process exits hard,
        once per run (an ``O_EXCL`` marker file in the node's temp dir, keyed by the run id), so Ray Data must
        restart the actor and retry the batch."""
        self._batches += 1
        if self._batches <= int(self._exit_after or 0):
            return
        marker = os.path.join(tempfile.gettempdir(), f"vlm2rec-embed-exit-{self._run_id or 'run'}")
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            self._exit_after = None  # already done in this run
            return
        log.warning("inject_actor_exit_after_batches=%s: exiting this actor (pid %d) on purpose", self._exit_after,
                    os.getpid())
        os._exit(1)


__all__ = ["BatchEncoder", "EmbedPredictor", "load_encoder"]
