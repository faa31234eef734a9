# One image for every role (worker, producer CLI). GPU hosts run it with the
# NVIDIA container runtime; pass BERTSTREAM_DEVICE=cuda:0.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    BERTSTREAM_CACHE_DIR=/var/cache/bertstream
WORKDIR /app
COPY pyproject.toml README.md ./
COPY contract ./contract
COPY producer ./producer
COPY worker ./worker
# TORCH_INDEX selects the wheel flavour: the CPU index for small images,
# https://download.pytorch.org/whl/cu124 (or newer) for GPU workers.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX" "torch<=2.13.0" \
 && pip install ".[worker]"
# Assemble the bundled model at build time so containers start fast.
RUN python -c "from pathlib import Path; from worker.sentiment.assemble import ensure_default_model; ensure_default_model(Path('/var/cache/bertstream'), progress=False)"
ENTRYPOINT ["bertstream"]
CMD ["worker"]
