# llmapiserver: OpenAI-compatible chat server for one GGUF model on llama.cpp.
#
#   GPU (default target):  docker build -t llmapiserver .
#   CPU only:              docker build --target cpu -t llmapiserver:cpu .
#
# Models are mounted, never baked in: -v /models:/models -e MODEL_PATH=/models/model.gguf
# Configuration is the server's env vars (API_KEYS, N_CTX, N_GPU_LAYERS, MMPROJ_PATH, ...).

ARG CUDA_VERSION=12.8.1
ARG UBUNTU=ubuntu24.04
# The CPU code in both images is built for x86-64-v3 (AVX2, FMA, F16C, BMI2: Intel Haswell / AMD
# Zen and later), never for the build machine's own CPU: llama.cpp's default -march=native built on
# an AVX-512 host dies with SIGILL on a host without it. For the build host only
# (what it costs is measured in README "Portable images"): --build-arg CPU_CMAKE_ARGS=-DGGML_NATIVE=ON
ARG CPU_CMAKE_ARGS="-DGGML_NATIVE=OFF"

###############################################################################
# GPU build stage: llama-cpp-python compiled with CUDA into a wheel
###############################################################################
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS cuda-build
# Turing (T4, RTX 20), Ampere (A100, A10, RTX 30), Ada (L4, L40, RTX 40), Hopper (H100, H200),
# Blackwell (B200, RTX 50). Fewer architectures build faster: --build-arg CUDA_ARCHITECTURES=90
ARG CUDA_ARCHITECTURES="75;80;86;89;90;100;120"
ARG CPU_CMAKE_ARGS
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev python3-venv build-essential cmake ninja-build git \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt /tmp/requirements.txt
# The driver library (libcuda) comes from the host at run time; link against the toolkit's stub.
RUN ln -sf /usr/local/cuda/lib64/stubs/libcuda.so /usr/local/cuda/lib64/stubs/libcuda.so.1 \
 && LD_LIBRARY_PATH=/usr/local/cuda/lib64/stubs \
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES} ${CPU_CMAKE_ARGS}" \
    pip wheel --no-deps --wheel-dir /wheels "$(grep '^llama-cpp-python==' /tmp/requirements.txt)"

###############################################################################
# CPU image
###############################################################################
FROM python:3.12-slim AS cpu
ARG CPU_CMAKE_ARGS
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
COPY requirements.txt /tmp/requirements.txt
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake libgomp1 \
 && CMAKE_ARGS="${CPU_CMAKE_ARGS}" pip install -r /tmp/requirements.txt \
 && apt-get purge -y build-essential cmake && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin app
COPY llmapiserver.py /app/llmapiserver.py
USER 10001
ENV HOST=0.0.0.0 PORT=8000 MODEL_PATH=/models/model.gguf N_GPU_LAYERS=0
EXPOSE 8000
VOLUME ["/models"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]
ENTRYPOINT ["python", "/app/llmapiserver.py"]

###############################################################################
# GPU image (the default target)
###############################################################################
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS gpu
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libgomp1 \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY --from=cuda-build /wheels /wheels
COPY requirements.txt /tmp/requirements.txt
RUN pip install /wheels/*.whl -r /tmp/requirements.txt && rm -rf /wheels
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin app
COPY llmapiserver.py /app/llmapiserver.py
USER 10001
ENV HOST=0.0.0.0 PORT=8000 MODEL_PATH=/models/model.gguf N_GPU_LAYERS=-1
EXPOSE 8000
VOLUME ["/models"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]
ENTRYPOINT ["python", "/app/llmapiserver.py"]
