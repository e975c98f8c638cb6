"""Run-level DSV policy: everything that spans layers and iterations.

``controller`` (the stage machine and per-layer decisions), ``lr`` (predictor optimizer groups and
their learning rate), ``writers`` (status lines, TensorBoard / W&B / JSON lines), ``speed_table``
(where sparse beats dense) and ``megatron`` (``DSVRuntime`` and its installation into a Megatron
training run). The runtime reads each layer's ``LayerStats`` and writes its ``LayerState``;
layers never import from here.
"""
