# The lynxkv server image: the package with its server extra, nothing else.
# Build: docker build -t lynxkv .
# Run: docker run -p 7470:7470 -v lynx:/var/lib/lynxkv/data lynxkv
# (binds 0.0.0.0 inside the container; put auth in front or pass --auth-token-file).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lynxkv ./lynxkv
RUN pip install --disable-pip-version-check ".[server]" \
    && useradd --system --home-dir /var/lib/lynxkv --create-home lynxkv
USER lynxkv
WORKDIR /var/lib/lynxkv
EXPOSE 7470
ENTRYPOINT ["lynxkv"]
CMD ["serve", "--host", "0.0.0.0", "--data-dir", "/var/lib/lynxkv/data"]
