# dots-serve on a CUDA build of PyTorch. Build from the repository root:
#   docker build -t dots-serve .
# The image's own torch (CUDA 12.8) is kept: pip sees the requirement already met and does not replace it.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/huggingface

WORKDIR /opt/dots-serve
COPY pyproject.toml README.md ./
COPY model ./model
COPY scheduler ./scheduler
COPY server ./server
COPY configs ./configs
# Pin torch to the version already in the image so that no dependency can pull another build.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir -c /tmp/torch-constraint.txt . \
    && rm /tmp/torch-constraint.txt

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin dots
USER 1000:1000
WORKDIR /home/dots

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["dots-serve", "--host", "0.0.0.0"]
CMD ["--port", "8000"]
