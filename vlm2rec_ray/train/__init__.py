"""Distributed fine-tuning: Ray Train ``TorchTrainer`` running DeepSpeed ZeRO in every worker.

- :mod:`~vlm2rec_ray.train.deepspeed_config`: ``build_deepspeed_config(cfg) -> dict``
- :mod:`~vlm2rec_ray.train.data`: the Ray Data training stream (catalog join, image fetch in CPU stages)
- :mod:`~vlm2rec_ray.train.module`: the module DeepSpeed wraps (encoder + objective parameters)
- :mod:`~vlm2rec_ray.train.loop`: ``train_step`` and the per-worker loop (logging, diagnostics, checkpoints)
- :mod:`~vlm2rec_ray.train.checkpoint`: checkpoint save/restore through Ray Train
- :mod:`~vlm2rec_ray.train.export`: Hugging Face export (adapter + merged weights + processor), model card
- :mod:`~vlm2rec_ray.train.trainer`: ``build_trainer`` / ``run_training`` (driver)

Heavy imports (ray, deepspeed, transformers) happen inside functions, so importing this package is cheap.
"""
