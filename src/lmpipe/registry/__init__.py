"""The model registry: the ``register`` stage, the MLflow pyfunc model, the promotion gate,
promote / rollback, and the Hugging Face ``transformers`` export.

- :func:`lmpipe.registry.register.run`: ``lmpipe register`` (log, register, tag, alias ``candidate``, gate).
- :func:`lmpipe.registry.promote.promote_if_better`, :func:`~lmpipe.registry.promote.promote`,
  :func:`~lmpipe.registry.promote.rollback`, :func:`~lmpipe.registry.promote.promote_candidates`:
  alias moves for pipelines and people.
- :func:`lmpipe.registry.export_hf.export_hf`: ``lmpipe export-hf``.

Submodules are imported on use: MLflow and transformers are slow to import.
"""
