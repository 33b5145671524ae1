"""Driver-side set-up of an embed run: paths made absolute, the endpoint made explicit, which Ray to use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vlm2rec_ray.config import EmbedJobConfig, load_config
from vlm2rec_ray.embed import plan as pipeline


def _cfg(*extra: str) -> EmbedJobConfig:
    return load_config(EmbedJobConfig, None, ["model.name=Qwen/Qwen2.5-VL-3B-Instruct", "model_version=v1",
                                              "output_uri=out", "dataset_uri=data", *extra])


def test_resolve_paths_makes_local_paths_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    (tmp_path / "model").mkdir()
    cfg = _cfg("catalog_uri=data/catalog.jsonl").with_absolute_paths()
    assert cfg.output_uri == str(tmp_path / "out") and cfg.dataset_uri == str(tmp_path / "data")
    assert cfg.catalog_uri == str(tmp_path / "data" / "catalog.jsonl")
    assert cfg.model.name == "Qwen/Qwen2.5-VL-3B-Instruct"  # a hub id (no such local dir) stays as it is
    assert cfg.storage.endpoint_url is None

    cfg = _cfg("model.name=model", "output_uri=s3://bkt/emb", "dataset_uri=s3://bkt/ds").with_absolute_paths()
    assert cfg.model.name == str(tmp_path / "model")
    assert cfg.output_uri == "s3://bkt/emb" and cfg.dataset_uri == "s3://bkt/ds" and cfg.catalog_uri is None
    assert cfg.with_absolute_paths() == cfg  # idempotent


def test_resolve_paths_pins_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert _cfg().with_absolute_paths().storage.endpoint_url == "http://127.0.0.1:9"
    # An explicit endpoint wins over the environment (the old keys endpoint_url / model.endpoint_url still map to it).
    for setting in ("storage.endpoint_url", "endpoint_url", "model.endpoint_url"):
        assert _cfg(f"{setting}=http://s3.local").with_absolute_paths().storage.endpoint_url == "http://s3.local"


def test_connect_ray_joins_the_cluster_at_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """The embed job (like train) uses the running Ray, else RAY_ADDRESS (as under `ray job submit`), else a
    private local instance."""
    import ray

    import vlm2rec_ray.runtime as runtime

    calls: list[Any] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append(("init", a, k)))
    monkeypatch.setattr(runtime, "init_local_ray", lambda *a, **k: calls.append(("local", a, k)))
    assert pipeline.connect_ray is runtime.connect_ray

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    pipeline.connect_ray()
    assert calls == [("init", (), {"address": "http://127.0.0.1:8265"})]

    calls.clear()
    monkeypatch.delenv("RAY_ADDRESS")
    pipeline.connect_ray()
    assert calls == [("local", (), {})]

    calls.clear()
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    pipeline.connect_ray()
    assert calls == []
