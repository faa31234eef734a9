"""What only a GPU shows: fp16 against fp32, a real CUDA out-of-memory, ``--gpus`` pinning.

Marked ``gpu`` and skipped where torch sees no CUDA device; ``bench/device.sh``
runs them (``pytest -m gpu``) on a lent device, and its CPU rehearsal runs
the same command. The CPU side of each mechanism has its own tests
(test_inference_oom.py, test_launcher_device.py, test_inference_pipelined.py).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from contract.liveness import live_workers
from contract.settings import Settings
from producer.client import Client
from worker.device import Placement
from worker.inference import infer_isolating
from worker.launcher import child_hostname
from worker.process import die_with_parent, settings_env
from worker.runner import HFRunner, PaddedBatch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

#: Largest difference of a probability between fp16 and fp32 that we accept.
FP16_TOLERANCE = 1e-2

TEXTS = [
    "这家酒店的服务很好,房间也很干净。", "the room was spotless and the staff were friendly",
    "terrible service, never again", "快递又晚到了三天客服一直不回复消息", "ok",
    "loved the movie but the ending felt rushed " * 6, "手机的拍照效果非常好" * 10,
]


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer random BERT (hidden 256, 512 positions): big enough to exercise fp16."""
    from tests.tinybert import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("gpu-bert"), layers=4, hidden=256, heads=4,
                           max_positions=512, cjk=2000)


def _runner(model_dir: Path, dtype: torch.dtype) -> HFRunner:
    return HFRunner(model_dir, Placement(torch.device("cuda:0"), dtype))


def test_fp16_matches_fp32_within_tolerance(gpu_model_dir: Path) -> None:
    texts = [TEXTS[i % len(TEXTS)] + f" {i}" for i in range(64)]
    results = {}
    for dtype in (torch.float32, torch.float16):
        runner = _runner(gpu_model_dir, dtype)
        encoded = runner.encode(texts)
        results[dtype] = runner.forward(runner.collate(encoded, list(range(len(texts)))))
        del runner
    diff = (results[torch.float16] - results[torch.float32]).abs().max().item()
    assert diff <= FP16_TOLERANCE, f"fp16 differs from fp32 by {diff:.4f}"
    # On CUDA a batch is padded to a width in steps of 8.
    assert results[torch.float16].shape[0] == len(texts)
    runner = _runner(gpu_model_dir, torch.float16)
    batch = runner.collate(runner.encode(["ok", "a slightly longer text"]), [0, 1])
    assert batch.input_ids.shape[1] % 8 == 0 and batch.real_tokens < batch.padded_tokens
    # Labels agree wherever fp32 is not within the tolerance of a tie.
    p32, p16 = results[torch.float32], results[torch.float16]
    clear = (p32.max(dim=1).values - p32.min(dim=1).values) > 2 * FP16_TOLERANCE
    assert torch.equal(p32.argmax(dim=1)[clear], p16.argmax(dim=1)[clear])


@pytest.fixture
def memory_cap() -> Iterator[int]:
    """Cap this process's CUDA allocator at what it holds now plus 256 MiB; lift it after."""
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    headroom = 256 * 2**20
    torch.cuda.set_per_process_memory_fraction(
        min(1.0, (torch.cuda.memory_reserved(0) + headroom) / total), 0)
    yield headroom
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    torch.cuda.empty_cache()


def test_real_cuda_oom_is_halved_and_loses_nothing(gpu_model_dir: Path,
                                                   memory_cap: int) -> None:
    runner = _runner(gpu_model_dir, torch.float16)
    # 1,024 texts of ~500 tokens: the attention scores alone need ~2 GB in fp16.
    texts = [f"{i} " + "the hotel room was clean quiet and the view was great " * 50
             for i in range(1024)]
    encoded = runner.encode(texts)
    rows = list(range(len(texts)))
    sizes: list[int] = []
    forward = runner.forward

    def counting(batch: PaddedBatch) -> torch.Tensor:
        sizes.append(batch.input_ids.shape[0])
        return forward(batch)

    runner.forward = counting  # type: ignore[method-assign]
    # The whole batch really does not fit. (No pytest.raises: its traceback would
    # keep the failed pass's activations alive and starve every retry.)
    try:
        forward(runner.collate(encoded, rows))
    except torch.OutOfMemoryError:
        whole_batch_fits = False
    else:
        whole_batch_fits = True
    assert not whole_batch_fits
    torch.cuda.empty_cache()
    out = infer_isolating(runner, encoded, rows)
    assert sorted(out) == rows
    failed = {r: v for r, v in out.items() if isinstance(v, str)}
    assert not failed, f"{len(failed)} rows failed, e.g. {next(iter(failed.values()))}"
    assert sizes[0] == len(rows) and min(sizes) < len(rows)  # halved at least once
    # Every row is scored as it would be alone: compare a sample run one at a time.
    for r in rows[:: len(rows) // 8]:
        alone = forward(runner.collate(encoded, [r]))[0]
        got = out[r]
        assert not isinstance(got, str)
        assert abs(got.scores["positive"] - float(alone[1])) <= FP16_TOLERANCE


def test_gpus_launcher_pins_each_process_and_serves(tiny_model_dir: Path, redis_url: str,
                                                    tmp_path: Path) -> None:
    settings = Settings(broker_url=redis_url, database_url=f"sqlite:///{tmp_path / 'r.db'}",
                        queue=f"bst-gpu-{uuid.uuid4().hex[:8]}", model=str(tiny_model_dir),
                        cache_dir=str(tmp_path / "cache"), max_wait_ms=20)
    log_path = tmp_path / "launcher.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from producer.cli import main; main()", "worker",
             "--gpus", "0", "--procs-per-gpu", "2"],
            env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent())
    host = socket.gethostname()
    names = [child_hostname("0", k, 2, host, prefix=f"bertstream-{proc.pid}") for k in range(2)]
    beats = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 120
        alive: set[str] = set()
        while alive != set(names):  # each child's heartbeat key, under its own name
            assert proc.poll() is None, log_path.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, f"only {alive} alive"
            alive = {w["hostname"] for w in live_workers(beats, settings.queue)}
            time.sleep(0.2)  # a poll interval while the children load the model
        with Client(settings) as client:
            report = client.submit_many([{"id": f"g-{i}", "text": TEXTS[i % len(TEXTS)]}
                                         for i in range(200)])
            rows = client.wait(report.ids, timeout=60)
        assert len(rows) == 200 and all(r.status == "done" for r in rows.values())
    finally:
        beats.close()
        proc.terminate()
        code = proc.wait(timeout=60)
    text = log_path.read_text(errors="replace")
    # Both children loaded the model on the one GPU they see, as cuda:0.
    assert text.count("cuda:0 (") >= 2, text[-4000:]
    assert text.count("warm-up: ") >= 2, text[-4000:]
    assert code == 0, text[-4000:]


def test_auto_precision_runs_a_float16_overflow_in_bfloat16(tmp_path: Path) -> None:
    """On CUDA ``auto`` is float16; a model past its range is loaded again in bfloat16
    (every GPU CUDA still ships for has it) and scores finitely there."""
    import math

    from tests.test_non_finite_scores import _beyond_float16
    from worker.app import build_runner
    from worker.device import resolve_placement

    path = _beyond_float16(tmp_path / "m")
    placement = resolve_placement("auto", "auto")
    assert placement.dtype == torch.float16
    runner = build_runner(Settings(model=str(path), dtype="auto"), placement)
    assert isinstance(runner, HFRunner) and runner.placement.dtype == torch.bfloat16
    got = runner.decode(runner.forward(runner.collate(runner.encode(TEXTS), [0, 1, 2])))
    assert all(math.isfinite(p) for pred in got for p in pred.scores.values())
