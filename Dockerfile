# The TRAICE server: FastAPI + WebSockets, dashboard, REST API. Workers (TraiceClient, Flower's
# traice_mod) do not need this image: they pip-install traice next to their training.
#
#   docker build -t traice .
#   docker run -p 3000:3000 -e TRAICE_ADMIN_TOKEN=... -e TRAICE_WORKER_TOKEN=... \
#              -e TRAICE_DATABASE_URL=postgresql://user:password@host:5432/traice traice
#
# docker-compose.yml runs it with PostgreSQL. On 0.0.0.0 the server refuses to start without an
# admin token and a worker token.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Only what the package needs (the build context may hold a virtualenv and test artifacts).
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /app traice \
    && mkdir -p /app/data && chown traice /app/data

USER traice
EXPOSE 3000
# Without TRAICE_DATABASE_URL the server keeps an SQLite file here (mount a volume to keep it).
ENV TRAICE_DATABASE_URL=sqlite:////app/data/traice.db

HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/healthz', timeout=4)"]

ENTRYPOINT ["traice", "server"]
CMD ["--host", "0.0.0.0", "--port", "3000", "--log-level", "info"]
