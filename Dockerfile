# cxr-gateway image: listener, worker and web console (the command picks the role).
# Pinned base: Debian 12 with CPython 3.11.7, as on the development machines.
FROM python:3.11.7-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY gateway ./gateway
COPY inference ./inference
COPY training ./training
COPY fhir_mappings ./fhir_mappings
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c constraints.txt . \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM python:3.11.7-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    CXR_DATA_DIR=/var/lib/cxr-gateway \
    CXR_MODEL_DIR=/opt/cxr-gateway/models/cxr-pneumonia-v1 \
    CXR_DICOM_BIND=0.0.0.0 \
    CXR_WEB_BIND=0.0.0.0
RUN groupadd --system --gid 10001 cxr \
 && useradd --system --uid 10001 --gid cxr --home-dir /var/lib/cxr-gateway --shell /usr/sbin/nologin cxr \
 && mkdir -p /var/lib/cxr-gateway \
 && chown cxr:cxr /var/lib/cxr-gateway
COPY --from=build /opt/venv /opt/venv
COPY models /opt/cxr-gateway/models
USER cxr
WORKDIR /var/lib/cxr-gateway
VOLUME ["/var/lib/cxr-gateway"]
EXPOSE 11112 8080
ENTRYPOINT ["cxr-gateway"]
CMD ["serve"]
