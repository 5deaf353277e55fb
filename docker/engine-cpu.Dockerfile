# Pensieve engine on CPU (kind, demos, CI). Build from the repository root:
#   docker build -f docker/engine-cpu.Dockerfile -t pensieve-engine:cpu .
# For a smaller image pass a CPU-only torch wheel index:
#   --build-arg TORCH_INDEX_URL=<index of CPU-only torch wheels>
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 HF_HOME=/models/.hf-home \
    TRITON_INTERPRET=1
RUN groupadd -g 10001 pensieve && useradd -u 10001 -g 10001 -m -d /home/pensieve pensieve
WORKDIR /opt/pensieve
COPY requirements/constraints.txt requirements/constraints.txt
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=""
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"; else pip install "$TORCH_SPEC"; fi \
 && pip install -c requirements/constraints.txt transformers tokenizers safetensors gguf triton numpy jinja2 \
        aiohttp prometheus-client redis huggingface_hub
COPY common/ common/
COPY kernels/ kernels/
COPY engine/ engine/
RUN pip install --no-deps ./common ./kernels ./engine
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["python", "-m", "pensieve.engine"]
CMD ["serve", "--dtype", "float32"]
