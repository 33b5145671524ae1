"""Datasets: schemas and validation, catalog/interaction/split readers, image fetch and decode, Amazon
Reviews preparation, the synthetic multimodal benchmark and image copying into object storage.

Nothing here imports ``model/`` or Ray: data flows one way (storage -> data -> model -> train/embed -> eval).
Import the submodules directly, e.g. ``from vlm2rec_ray.data.catalog import read_catalog``.
"""
