# Pensieve router (session-affine chat endpoint): its own distribution, with neither torch
# nor the engine. Build from the repository root:
#   docker build -f docker/router.Dockerfile -t pensieve-router:0.1.0 .
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN groupadd -g 10001 pensieve && useradd -u 10001 -g 10001 -m -d /home/pensieve pensieve
WORKDIR /opt/pensieve
COPY requirements/constraints.txt requirements/constraints.txt
RUN pip install -c requirements/constraints.txt aiohttp prometheus-client kubernetes
COPY common/ common/
COPY router/ router/
RUN pip install --no-deps ./common ./router
USER 10001:10001
EXPOSE 8080
CMD ["python", "-m", "pensieve.router"]
