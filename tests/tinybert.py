"""The tests' tiny random BERT: see worker/tinybert.py (shared with the benchmark)."""

from worker.tinybert import write_tiny_bert

__all__ = ["write_tiny_bert"]
