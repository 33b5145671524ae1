"""The method testbed: fine-tune and evaluate in one process, fast enough for seeds and grids on a CPU.

The production path (``vlm2rec train`` on Ray Train + DeepSpeed, ``vlm2rec embed`` on Ray Data, ``vlm2rec
evaluate``) costs about a minute of start-up per run on a 2-core box; a study of 5 methods x 3 seeds x a
tuning grid needs hundreds of runs. This room runs the *same* pieces without Ray:

- :mod:`.data`: a prepared dataset in memory (catalog titles, decoded images, splits);
- :mod:`.finetune`: :func:`vlm2rec_ray.train.loop.build_train_module` + :func:`build_optimizer` +
  :func:`compute_loss` + :func:`gradient_alignment_step`, in a plain loop with the job's batch, epochs,
  clipping and logging;
- :mod:`.evaluate`: item and sequence embeddings in the embed job's table layout, then the evaluate job's
  Task 1, modality dropout and geometry functions;
- :mod:`.study`: the SFT vs VLM2Rec study (tuning on valid, 3 seeds on test), written to JSON and Markdown.

One deliberate difference from a Ray Train run with W workers: the step's batch of
``per_device_batch_size * num_workers`` rows lives in one process, so CRTR's in-batch targets are all of them
(on W workers each worker's CRTR sees its own ``per_device_batch_size``). InfoNCE/WPCL candidates are the
same (a Ray run gathers every worker's targets).
"""
