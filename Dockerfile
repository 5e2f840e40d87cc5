# The cape worker appliance: supervisord (a child of `cape-worker run`) runs poller, messenger, runner, uploader.
#   docker build -t cape-worker .
#   docker run -e CAPE_TOKEN -e CAPE_COORDINATOR -e CAPE_BUCKET -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY \
#       -e AWS_REGION -v cape-spool:/var/lib/cape-worker/spool -v cape-state:/var/lib/cape-worker/state cape-worker
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CAPE_WORKER_CONF=/app/conf/supervisord.conf \
    CAPE_SPOOL_DIR=/var/lib/cape-worker/spool \
    CAPE_STATE_DIR=/var/lib/cape-worker/state

WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
COPY conf ./conf
RUN pip install --no-cache-dir . \
    && groupadd --system --gid 10001 cape \
    && useradd --system --uid 10001 --gid cape --home-dir /var/lib/cape-worker --shell /usr/sbin/nologin cape \
    && mkdir -p /var/lib/cape-worker/spool /var/lib/cape-worker/state \
    && chown -R cape:cape /var/lib/cape-worker \
    && chmod 0700 /var/lib/cape-worker/state

USER 10001:10001
VOLUME ["/var/lib/cape-worker/spool", "/var/lib/cape-worker/state"]

# Unhealthy unless all four programs are RUNNING (supervisorctl status exits 0 even in BACKOFF) and the
# coordinator accepts CAPE_TOKEN.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 CMD ["cape-worker", "health"]

# docker stop sends SIGTERM: cape-worker forwards it to supervisord, which stops the group within 10 s.
# As PID 1 (no --init, or Kubernetes) it also reaps orphaned processes, so none stays a zombie.
CMD ["cape-worker", "run"]
