"""The training console: one progress line per logging interval, Ray Train's report lines and library
FutureWarnings off in the workers unless VLM2REC_VERBOSE=1."""

from __future__ import annotations

import logging
import warnings

import pytest

from vlm2rec_ray.runtime import verbose
from vlm2rec_ray.train.loop import format_progress, quiet_worker_output


def test_progress_line() -> None:
    row = {"step": 20, "epoch": 0.2326, "loss": 2.94651, "loss_wpcl": 2.9258, "loss_crtr": 0.0207, "lr": 5e-4,
           "samples_per_s": 145.06, "data_wait_frac": 0.013, "report_frac": 0.0, "compute_frac": 0.9,
           "grad_align/cos_total_image": 0.3559}
    assert format_progress(row, 172) == ("step 20/172  epoch 0.23  loss 2.9465 (wpcl 2.9258, crtr 0.0207)  "
                                         "145.1 samples/s  data_wait 0.01  report 0.00  lr 5.00e-04  cos(g,g_V) 0.356")


@pytest.mark.parametrize(("value", "expected"), [(None, False), ("", False), ("0", False), ("false", False),
                                                 ("1", True), ("yes", True)])
def test_verbose_flag(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool) -> None:
    if value is None:
        monkeypatch.delenv("VLM2REC_VERBOSE", raising=False)
    else:
        monkeypatch.setenv("VLM2REC_VERBOSE", value)
    assert verbose() is expected


def test_quiet_worker_output_silences_ray_train_reports_and_future_warnings() -> None:
    from ray.train.v2._internal.execution import context, storage

    loggers = [logging.getLogger(context.__file__), logging.getLogger(storage.__name__)]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            quiet_worker_output()
            assert all(not lg.isEnabledFor(logging.INFO) for lg in loggers)
            warnings.warn("old api", FutureWarning, stacklevel=1)
            warnings.warn("kept", UserWarning, stacklevel=1)
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
    assert [str(w.message) for w in caught] == ["kept"]
