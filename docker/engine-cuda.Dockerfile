# Pensieve engine on NVIDIA GPUs. Build from the repository root:
#   docker build -f docker/engine-cuda.Dockerfile -t pensieve-engine:cuda .
# The default Linux torch wheel bundles the CUDA runtime; the node's driver comes in
# through the NVIDIA container runtime (nvidia.com/gpu resource).
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 HF_HOME=/models/.hf-home
RUN groupadd -g 10001 pensieve && useradd -u 10001 -g 10001 -m -d /home/pensieve pensieve
WORKDIR /opt/pensieve
COPY requirements/constraints.txt requirements/constraints.txt
ARG TORCH_SPEC=torch==2.13.0
RUN pip install "$TORCH_SPEC" \
 && pip install -c requirements/constraints.txt transformers tokenizers safetensors gguf triton numpy jinja2 \
        aiohttp prometheus-client redis huggingface_hub
COPY common/ common/
COPY kernels/ kernels/
COPY engine/ engine/
RUN pip install --no-deps ./common ./kernels ./engine
USER 10001:10001
EXPOSE 8000
# Flags also come from PENSIEVE_<FLAG> variables (the operator sets them from a ConfigMap).
ENTRYPOINT ["python", "-m", "pensieve.engine"]
CMD ["serve"]
