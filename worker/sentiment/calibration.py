"""The temperature the runner divides the logits by (temperature scaling).

A temperature fitted on dev (``bertstream model calibrate``, in the training
package) is stored in the adapter's ``meta.json`` under ``calibration`` and
written into the assembled model directory as ``calibration.json``, where the
worker's runner reads it. It never changes the arg-max label, only how sure
the scores are.
"""

from __future__ import annotations

import json
from pathlib import Path

CALIBRATION_FILE = "calibration.json"
def load_temperature(model_dir: Path) -> float | None:
    """The temperature stored in ``model_dir/calibration.json``, or None without one.

    Raises ValueError when the file is there but does not hold a positive number.
    """
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    value = json.loads(path.read_text(encoding="utf-8")).get("temperature")
    if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{path}: temperature must be a positive number, got {value!r}")
    return float(value)


def write_temperature(model_dir: Path, temperature: float) -> None:
    """Write ``calibration.json`` (the temperature the runner applies) into ``model_dir``."""
    (Path(model_dir) / CALIBRATION_FILE).write_text(
        json.dumps({"temperature": temperature}) + "\n", encoding="utf-8")
