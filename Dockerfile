# syntax=docker/dockerfile:1
# ivr-server: a multi-stage build. The builder compiles the release binary; the runtime image is a
# slim Debian with the binary alone, run as an unprivileged user.
#
#   docker build -t ivr-server .
#   docker run --rm -e SECRET_KEY=... -e ARI_PASSWORD=... -p 8000:8000 ivr-server
#
# deploy/compose.yaml runs it with PostgreSQL, Traefik, Prometheus and Grafana.

FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the build between image builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ivr-server \
 && install -D -m 0755 target/release/ivr-server /out/ivr-server

FROM debian:bookworm-slim AS runtime
# ca-certificates only: ivr speaks plain http to ARI on the private network, but PostgreSQL may use TLS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 ivr \
 && useradd --system --uid 10001 --gid ivr --home-dir /var/lib/ivr --create-home --shell /usr/sbin/nologin ivr
COPY --from=builder /out/ivr-server /usr/local/bin/ivr-server
USER ivr:ivr
WORKDIR /var/lib/ivr
ENV LISTEN_ADDR=0.0.0.0:8000 \
    LOG_FORMAT=json \
    DATABASE_URL=sqlite:///var/lib/ivr/ivr.db
EXPOSE 8000
# The binary checks itself: no curl in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["ivr-server", "healthcheck"]
ENTRYPOINT ["ivr-server"]
CMD ["serve"]
