"""Checkpoints that survive faults, in three rooms.

- ``files``: one process, no collectives: the layout, the manifest, verification, the pickle scan, safe loading.
  Export, inference, the CLI and the backends import only this.
- ``policy``: which checkpoint a run resumes (and may resume), what it sets aside, what it prunes.
- ``checkpointer``: the ``Checkpointer``, which every process of a run calls to save and restore it together
  (with ``rng``, each process's random state).

Layout: ``output_dir/checkpoints/step-000100/`` holding Accelerate's ``save_state`` (DeepSpeed engine
files under ZeRO, else model/optimizer), ``trainer_state.json``, ``rng_state_<rank>.pt`` for every
process, the resolved ``config.yaml``, a ``MANIFEST.json`` (size + sha256 of every file) and, last, a
``COMPLETE`` marker.

Saves are atomic: everything is written to ``.tmp-step-000100/``, the manifest and marker go in last,
and only then is the folder renamed into place. Old checkpoints are pruned only after the new one is
complete (the reverse of Accelerate's ``total_limit``, which deletes first). So is the previous run's
``checkpoints.replaced-<time>/`` that ``resume=overwrite`` set aside: kept until this run's first checkpoint is
whole, then deleted by the prune that follows it (unless ``keep_last`` is 0, which keeps all). Frozen weights are never
saved: projector and LoRA checkpoints hold only what trains.
"""
