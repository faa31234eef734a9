"""``python -m worker``: the worker command without the producer CLI around it."""

from worker.cli import worker_command

if __name__ == "__main__":
    worker_command(prog_name="bertstream worker")
