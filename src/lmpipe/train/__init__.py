"""Pretraining with PyTorch Lightning: config, data, module, callbacks, checkpoints, the stage.

Kept import-free so that ``lmpipe.train.config`` (read by ``lmpipe --help``) does not pull in
Lightning; import the submodules you need (``lmpipe.train.pretrain.run`` is the stage).
"""
