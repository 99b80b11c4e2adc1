# flashstep server on a CUDA PyTorch runtime.
#
#   docker build -t flashstep .
#   docker run --gpus all -p 8000:8000 -v "$PWD/my-models:/models" \
#       -e FLASHSTEP_ADMIN_TOKEN=change-me flashstep
#
# /models is the models root: the only folder checkpoints load from. The image seeds it with the
# shipped models, so an empty named volume starts with them; a bind mount replaces them.
# Settings come from FLASHSTEP_* variables (server/settings.py) or flags after `flashstep serve`.
# On `docker stop` the server finishes in-flight requests (up to FLASHSTEP_GRACEFUL_SHUTDOWN_S,
# default 60 s): give it that long, e.g. `docker stop -t 70`.
# The server limits bodies (FLASHSTEP_MAX_BODY_BYTES, FLASHSTEP_BODY_READ_TIMEOUT_S), headers and idle
# connections itself; a reverse proxy in front (TLS, rate limits) is welcome but not required.

# The base image's torch (CUDA build) satisfies the project's `torch>=2.4`, so pip keeps it.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# 1. The project, installed (not editable) from the packages setuptools ships; sources removed.
WORKDIR /tmp/flashstep-src
COPY pyproject.toml README.md ./
COPY flashstep/ flashstep/
COPY server/ server/
COPY models/ models/
COPY kernels/ kernels/
COPY training/ training/
COPY bench/ bench/
# FLASHSTEP_EXTRAS=ray adds Ray Serve (`flashstep serve --ray`, deploy/kuberay/rayservice.yaml).
ARG FLASHSTEP_EXTRAS=""
RUN python -m pip install ".${FLASHSTEP_EXTRAS:+[$FLASHSTEP_EXTRAS]}" \
    && python -c "import flashstep.server.app, torch; print('flashstep on torch', torch.__version__)"

# 2. A non-root user, and the models root seeded with the shipped models.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin flashstep \
    && mkdir -p /models \
    && cp -a models/shipped/. /models/ \
    && chown -R flashstep:flashstep /models \
    && rm -rf /tmp/flashstep-src

WORKDIR /home/flashstep
USER flashstep
VOLUME ["/models"]

ENV FLASHSTEP_MODELS_ROOT=/models \
    FLASHSTEP_PORT=8000
EXPOSE 8000

# Healthy = ready: models loaded and warm (GET /readyz is 503 before, and while shutting down).
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('FLASHSTEP_PORT', '8000'), timeout=4)"]

CMD ["flashstep", "serve", "--host", "0.0.0.0"]
