"""Training with PyTorch Lightning: one loop for every stage that trains.

- ``pretrain/``, ``finetune/``, ``distill/``: each stage's config section (``config.py``) and entry
  point (``stage.py``), plus what only that stage reads (task data, distillation losses);
- shared pieces here: ``settings.py`` (optimisation, hardware, checkpoint and logging settings,
  the run key), ``module.py`` (the LightningModule and its objectives' protocol), ``loop.py``
  (the trainer and the one ``fit()``), ``callbacks.py``, ``checkpoint.py``, ``lora.py`` and
  ``data.py`` (the pretraining token reader).

Kept import-free so that the config modules (read by ``lmpipe --help``) do not pull in Lightning;
import the submodules you need (``lmpipe.train.pretrain.stage.run`` is the stage).
"""
