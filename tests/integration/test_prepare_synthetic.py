"""`vlm2rec prepare synthetic` straight to S3 (moto on 127.0.0.1), read back through the same readers."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from vlm2rec_ray import storage
from vlm2rec_ray.cli import app
from vlm2rec_ray.data.catalog import (
    read_catalog,
    read_interactions,
    read_split,
    read_stats,
    resolve_image_uri,
)
from vlm2rec_ray.data.images import load_image

pytestmark = pytest.mark.integration


def test_synthetic_to_s3_loads_through_readers(moto_endpoint: str, s3_bucket: str) -> None:
    out = f"s3://{s3_bucket}/synthetic"
    result = CliRunner().invoke(app, ["prepare", "synthetic", "--out", out, "--num-items", "50", "--num-users", "30",
                                      "--endpoint", moto_endpoint])
    assert result.exit_code == 0, result.output
    catalog = read_catalog(out)
    assert catalog.num_rows == 50
    assert read_interactions(out, catalog=catalog).num_rows == read_stats(out)["interactions"]
    assert read_split(out, "test").num_rows == 30
    assert len(storage.list_uris(f"{out}/images", suffix=".png")) == 50
    row = catalog.to_pylist()[7]
    im, reason = load_image(resolve_image_uri(row["image_uri"], f"{out}/catalog.parquet"), min_pixels=56 * 56,
                            max_pixels=112 * 112, allowed_roots=[out])
    assert reason is None and im.size == (64, 64)
