# Pensieve operator (kopf); no torch. Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t pensieve-operator:0.1.0 .
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN groupadd -g 10001 pensieve && useradd -u 10001 -g 10001 -m -d /home/pensieve pensieve
WORKDIR /opt/pensieve
COPY requirements/constraints.txt requirements/constraints.txt
RUN pip install -c requirements/constraints.txt kopf kubernetes pyyaml aiohttp
COPY common/ common/
COPY operator/ operator/
RUN pip install --no-deps ./common ./operator
USER 10001:10001
EXPOSE 8080
CMD ["python", "-m", "pensieve.operator"]
