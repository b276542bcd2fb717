# syntax=docker/dockerfile:1
# One image for every Conclave process: `conclave worker|runtime|projector|...`.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml ./
COPY conclave ./conclave
COPY schemas ./schemas
COPY streams ./streams
COPY projections ./projections
RUN /opt/venv/bin/pip install .

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/conclave conclave \
    && install -d -o conclave -g conclave /app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# SQL migrations and topic specs are read from ./infra at run time (not a Python package).
COPY infra ./infra
USER conclave
ENTRYPOINT ["conclave"]
CMD ["--help"]
