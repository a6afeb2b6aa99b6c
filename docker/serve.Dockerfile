# The prediction service: slim, non-root, with a healthcheck. Build from the repository root:
#   docker build -f docker/serve.Dockerfile -t clip-har-serve .
#   docker run --rm -p 8000:8000 -v $PWD/outputs:/app/outputs:ro clip-har-serve
# It serves /app/outputs/export/onnx-fp32 (override with --model) and records its answers in /app/monitor (mount a volume there). Keys: -e CLIP_HAR_API_KEYS=... -e CLIP_HAR_ADMIN_KEYS=...
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
RUN useradd --create-home --uid 10001 clip && mkdir -p /app/monitor && chown 10001 /app/monitor  # prediction records (a volume)
WORKDIR /app
COPY settings.ini setup.py README.md ./
COPY clip_har ./clip_har
RUN pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu \
 && pip install ".[serve,export]"
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"
# uvicorn handles SIGTERM: it stops accepting, finishes in-flight requests, then exits (docker stop's default 10 s is enough
# for the default 30 s request timeout only when requests are short; raise --stop-timeout for long videos).
ENTRYPOINT ["clip-har", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "outputs/export/onnx-fp32", "--set", "serve.record_url=sqlite:////app/monitor/predictions.db"]
