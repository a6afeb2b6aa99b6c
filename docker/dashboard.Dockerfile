# The Voila dashboard, talking to the API (CLIP_HAR_API_URL) or to a local model. Build from the repository root:
#   docker build -f docker/dashboard.Dockerfile -t clip-har-dashboard .
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
RUN useradd --create-home --uid 10001 clip
WORKDIR /app
COPY settings.ini setup.py README.md ./
COPY clip_har ./clip_har
RUN pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu \
 && pip install ".[serve,export,dashboard]"
USER 10001
EXPOSE 8866
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8866/', timeout=2).status != 200)"
ENTRYPOINT ["clip-har", "dashboard", "--host", "0.0.0.0", "--port", "8866"]
