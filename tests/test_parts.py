"""Files split for a device call's transfer limit, and joined again with their hashes checked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from producer.cli import main as cli_main
from training.parts import PartsError, join_parts, manifest_path, split_file, split_large


@pytest.mark.parametrize("size", [1, 99, 100, 101, 1000, 1001])
def test_split_then_join_gives_the_same_bytes(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    parts = split_file(path, 100)
    assert not path.exists() and len(parts) == -(-size // 100)
    assert all(0 < p.stat().st_size <= 100 for p in parts)
    assert json.loads(manifest_path(path).read_text())["bytes"] == size
    assert join_parts(tmp_path) == [path]
    assert path.read_bytes() == data
    assert sorted(tmp_path.iterdir()) == [path], "parts and manifest are removed"


def test_only_files_above_the_limit_are_split(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    big, small = tmp_path / "adapter" / "big", tmp_path / "meta.json"
    big.write_bytes(b"x" * 250)
    small.write_bytes(b"y" * 100)
    assert split_large(tmp_path, 100) == [big]
    assert small.read_bytes() == b"y" * 100
    assert len(list(big.parent.glob("big.part[0-9]*"))) == 3
    assert join_parts(tmp_path) == [big] and big.read_bytes() == b"x" * 250
    assert split_large(tmp_path, 1000) == [] and join_parts(tmp_path) == []


def _split(tmp_path: Path) -> tuple[Path, list[Path]]:
    path = tmp_path / "w.bin"
    path.write_bytes(os.urandom(300))
    return path, split_file(path, 100)


def test_a_missing_part_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    path, parts = _split(tmp_path)
    parts[1].unlink()
    with pytest.raises(PartsError, match="part002: missing"):
        join_parts(tmp_path)
    assert not path.exists() and parts[0].exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_part_is_refused(tmp_path: Path, damage: str) -> None:
    path, parts = _split(tmp_path)
    data = parts[2].read_bytes()
    parts[2].write_bytes(data[:-1] if damage == "truncate" else bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(PartsError, match="part003"):
        join_parts(tmp_path)
    assert not path.exists()


def test_a_manifest_cannot_write_outside_its_folder(tmp_path: Path) -> None:
    path, _ = _split(tmp_path)
    manifest = manifest_path(path)
    spec = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**spec, "name": "../escaped"}))
    with pytest.raises(PartsError, match="not a plain name"):
        join_parts(tmp_path)
    manifest.write_text("{not json")
    with pytest.raises(PartsError, match="not a parts manifest"):
        join_parts(tmp_path)


def test_the_join_command(tmp_path: Path) -> None:
    path, _ = _split(tmp_path)
    data_parts = b"".join(p.read_bytes() for p in sorted(tmp_path.glob("w.bin.part[0-9]*")))
    result = CliRunner().invoke(cli_main, ["model", "join", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "sha256 checked" in result.output and path.read_bytes() == data_parts
    result = CliRunner().invoke(cli_main, ["model", "join", str(tmp_path)])
    assert result.exit_code == 2 and "nothing to join" in result.output


def test_the_join_command_reports_a_missing_part_in_one_line_exit_2(tmp_path: Path) -> None:
    """As every other model command reports a bad input: exit 2, one line, no traceback."""
    path, parts = _split(tmp_path)
    parts[1].unlink()
    result = CliRunner().invoke(cli_main, ["model", "join", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"Error: {parts[1]}: missing (No such file or directory)"]
    assert not path.exists() and parts[0].exists()
