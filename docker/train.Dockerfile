# Training on a GPU: CUDA base, the package with the training and tracking extras, the pipeline's notebooks (the stages
# run them with papermill). Build from the repository root:
#   docker build -f docker/train.Dockerfile -t clip-har-train .
#   docker run --gpus all --rm -v $PWD/outputs:/app/outputs -v $HOME/.cache/huggingface:/home/clip/.cache/huggingface clip-har-train
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-venv git && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 clip
WORKDIR /app
RUN python3 -m venv /venv
ENV PATH=/venv/bin:$PATH
COPY settings.ini setup.py README.md ./
COPY clip_har ./clip_har
RUN pip install torch==2.14.1 torchvision==0.29.1 && pip install ".[track,export,gpu]" papermill ipykernel \
 && python -m ipykernel install --sys-prefix --name python3
COPY nbs ./nbs
COPY params.yaml dvc.yaml ./
RUN chown -R clip /app
USER 10001
# the stages one after another (DVC needs the git repository: mount a checkout instead and run `clip-har pipeline`)
ENTRYPOINT ["clip-har"]
CMD ["pipeline", "--no-dvc"]
