# One image for the loraplex operator and sidecar: `loraplex operator` / `loraplex sidecar`.
FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/loraplex
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN /opt/loraplex/bin/pip install .

FROM python:3.11.14-slim-bookworm
COPY --from=build /opt/loraplex /opt/loraplex
ENV PATH=/opt/loraplex/bin:$PATH PYTHONUNBUFFERED=1
USER 1000:1000
ENTRYPOINT ["loraplex"]
CMD ["operator", "--all-namespaces"]
