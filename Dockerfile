# One image for every role: worker, API (bertstream serve), migrations, CLI.
#   docker build -t bertstream:latest .                                   # CPU torch
#   docker build -t bertstream:gpu --build-arg TORCH_FLAVOUR=cu128 .      # CUDA torch
# Needs BuildKit (the default builder of current Docker). The runtime carries
# contract, producer, worker and api only: not the training pipeline, the
# benchmark or the tests (.dockerignore lets nothing else in).
ARG PYTHON_IMAGE=python:3.11-slim

# -- deps: a virtual environment with the third-party packages only, so a code
#    change reuses this layer; rebuilt when pyproject.toml changes.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
# TORCH_FLAVOUR picks the wheel flavour on the PyTorch index: cpu (small) or a
# CUDA build (cu126, cu128, ...) for GPU workers. TORCH_FIND_LINKS adds a
# directory of wheels (a URL) to look in first, for hosts with a local wheel.
ARG TORCH_FLAVOUR=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/${TORCH_FLAVOUR}
ARG TORCH_FIND_LINKS=
# A CA bundle for pip behind an intercepting proxy, given as a build secret
# (docker build --secret id=pip_cert,src=...): never stored in a layer.
RUN --mount=type=secret,id=pip_cert --mount=type=cache,target=/root/.cache/pip \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && /opt/venv/bin/pip install --index-url "$TORCH_INDEX" \
      ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} "torch<=2.13.0"
ARG EXTRAS=worker,api
COPY pyproject.toml /src/
RUN --mount=type=secret,id=pip_cert --mount=type=cache,target=/root/.cache/pip \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && python3 -c "import sys, tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + [d for e in sys.argv[1].split(',') for d in p['optional-dependencies'][e]]))" \
      "$EXTRAS" > /src/requirements.txt \
 && /opt/venv/bin/pip install -r /src/requirements.txt

# -- build: bertstream itself as a wheel, and the bundled model assembled once.
FROM deps AS build
# pyproject.toml names README.md as the long description; a stub keeps README
# edits from rebuilding the package and the model.
RUN echo "bertstream: streaming, micro-batched BERT text analysis" > /src/README.md
COPY contract /src/contract
COPY producer /src/producer
COPY worker /src/worker
COPY api /src/api
RUN --mount=type=secret,id=pip_cert --mount=type=cache,target=/root/.cache/pip \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels /src \
 && /opt/venv/bin/pip install --no-deps /wheels/*.whl
# Built as root into private temp directories: made readable by the runtime user.
RUN HF_HUB_OFFLINE=1 /opt/venv/bin/python -c "from pathlib import Path; \
from worker.sentiment.assemble import ensure_default_model; \
ensure_default_model(Path('/var/cache/bertstream'), progress=False)" \
 && chmod -R a+rX /var/cache/bertstream

# -- runtime: the interpreter, the environment, the model; no compiler, no pip cache.
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 \
    BERTSTREAM_CACHE_DIR=/var/cache/bertstream
RUN groupadd --system --gid 10001 bertstream \
 && useradd --system --uid 10001 --gid bertstream --home-dir /home/bertstream \
      --create-home --shell /usr/sbin/nologin bertstream
COPY --from=deps /opt/venv /opt/venv
COPY --from=build /var/cache/bertstream /var/cache/bertstream
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/*.whl
USER bertstream
WORKDIR /home/bertstream
# The default role is the worker: healthy once it consumes and its heartbeat
# is fresh in Redis. docker-compose.yml gives the API and one-shot roles theirs.
HEALTHCHECK --interval=15s --timeout=10s --start-period=120s --retries=3 \
  CMD ["python", "-m", "worker.healthcheck"]
ENTRYPOINT ["bertstream"]
CMD ["worker"]
