# The lynxkv server image: the package with its server extra, nothing else.
# Build: docker build -t lynxkv .
# The `serve` command lands with issue 3; until then the image runs the CLI
# (encode / decode / inspect), e.g. `docker run --rm -v $PWD:/data lynxkv inspect /data/obj.lkv`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lynxkv ./lynxkv
RUN pip install --disable-pip-version-check ".[server]" \
    && useradd --system --home-dir /var/lib/lynxkv --create-home lynxkv
USER lynxkv
WORKDIR /var/lib/lynxkv
ENTRYPOINT ["lynxkv"]
CMD ["--help"]
