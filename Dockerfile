# syntax=docker/dockerfile:1
# Klein Gateway, the HTTP service (no torch: the GPU backend is Dockerfile.local).
#
#   docker build -t klein-gateway .
#   docker run -p 8080:8080 -e FAL_KEY=... klein-gateway
#
# The config is baked in at /etc/klein (providers.yaml, pricing/); mount your
# own over it, or point KLEIN_CONFIG / KLEIN_PRICING elsewhere. Images the
# gateway serves itself go to /var/lib/klein/images (the filesystem store) unless
# KLEIN_IMAGE_STORE=s3. SIGTERM drains (gateway.shutdown_grace_s, 25 s by
# default): give the container at least that long to stop.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/klein
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY local_backend ./local_backend
RUN /opt/klein/bin/pip install .

FROM python:${PYTHON_VERSION}-slim
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin klein \
 && install -d -o klein -g klein /var/lib/klein/images
COPY --from=build /opt/klein /opt/klein
COPY providers.yaml /etc/klein/providers.yaml
COPY pricing /etc/klein/pricing
ENV PATH=/opt/klein/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    KLEIN_CONFIG=/etc/klein/providers.yaml \
    KLEIN_PRICING=/etc/klein/pricing \
    KLEIN_IMAGE_DIR=/var/lib/klein/images
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# No --workers: one worker unless REDIS_URL is set, then one per CPU the container may use
# (several workers without Redis would each keep their own idempotency keys, limits and budgets).
ENTRYPOINT ["klein-gateway", "serve", "--host", "0.0.0.0", "--port", "8080"]
