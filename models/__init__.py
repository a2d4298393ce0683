"""label-audit: models.

One file per model family (``efficientnet_lite.py``, ``resnet.py``: module, preprocessing
constants, checkpoint source), ``registry.py`` (config name -> ``ModelSpec``),
``predictor.py`` (``JitPredictor``), ``checkpoints.py`` (safe Flax format, conversion
cache, users' checkpoints), ``torch_checkpoint.py`` (restricted reader of torch files).
"""
