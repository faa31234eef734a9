"""The training pipeline of the bundled sentiment model (the ``train`` extra).

Data (data.py), LoRA training on a frozen-prefix cache (train.py, lora.py,
frozen_prefix.py), evaluation with the behavioural suite and calibration
(evaluate.py, behaviour.py, calibration.py, suite/), CPU speed (speed.py),
and the ``bertstream model train|eval|calibrate|speed`` commands (cli.py).
The runtime (``worker``) never imports it.
"""
