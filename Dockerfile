# syntax=docker/dockerfile:1
#
# The mq-cutover image: the daemon and its CLI, nothing else (the final stage, the default target).
#
#   docker build -t mq-cutover:0.1.0 .
#   docker run --rm -v "$PWD/config/mq-cutover.toml:/etc/mq-cutover/mq-cutover.toml:ro" mq-cutover:0.1.0
#
# Other subcommands replace the default command:
#   docker run --rm mq-cutover:0.1.0 check-config --config /etc/mq-cutover/mq-cutover.toml
#
# The kit (crates/testkit: the demo reward service and the traffic generator) is an image of its
# own, for the compose demo only:
#   docker build --target kit -t mqc-kit:0.1.0 .
#   docker run --rm mqc-kit:0.1.0 reward-service --listen 0.0.0.0:18080
#
# Needs BuildKit (the default builder of current Docker) for the cache mounts.

# ---- builder ---------------------------------------------------------------------------------
# The Rust version of Cargo.toml's rust-version, on Debian 12 like the runtime stage, so the
# binary links against the same glibc.
FROM rust:1.95.0-slim-bookworm AS builder

# rdkafka is built with `cmake-build`: librdkafka is compiled from source and linked statically,
# which needs cmake and a C/C++ toolchain; librdkafka includes curl's header even with curl
# support off, hence libcurl4-openssl-dev (the binary does not link libcurl). zlib is linked
# dynamically (libz-sys finds it through pkg-config), as in the test bed. TLS and SASL (rdkafka
# features `ssl` and `sasl`) link Debian's OpenSSL 3 and Cyrus SASL dynamically too.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        cmake make g++ pkg-config zlib1g-dev libcurl4-openssl-dev libssl-dev libsasl2-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# A workspace member: Cargo reads its manifest even when it builds the daemon alone.
COPY crates ./crates

# The registry and the target directory are cache mounts: a rebuild after a source change
# compiles only the crate itself, not its ~300 dependencies. The binary is copied out of the
# cache mount because the mount is not part of the image. It is not stripped: the release
# profile keeps line tables so that a panic's backtrace names the line.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mq-cutover --bin mq-cutover \
    && cp target/release/mq-cutover /usr/local/bin/mq-cutover

# ---- kit-builder: the kit's binary, built only for the `kit` target ---------------------------
FROM builder AS kit-builder
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mqc-testkit --bin mqc-kit \
    && cp target/release/mqc-kit /usr/local/bin/mqc-kit

# ---- runtime-base: what both runtime images need ---------------------------------------------
FROM debian:12.11-slim AS runtime-base

# ca-certificates: the sink's HTTPS client checks servers against the system roots (Redis TLS
# brings its own roots). zlib1g, libssl3, libsasl2-2: the shared libraries beyond glibc (zlib for
# librdkafka's gzip, OpenSSL and Cyrus SASL for its TLS and SASL). curl: the HEALTHCHECK below.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates zlib1g libssl3 libsasl2-2 curl \
    && rm -rf /var/lib/apt/lists/*

# An unprivileged user with a fixed id, so that Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 mq-cutover \
    && useradd --system --uid 10001 --gid mq-cutover --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin mq-cutover

# ---- kit: the demo reward service and the traffic generator (`--target kit`) ------------------
FROM runtime-base AS kit
COPY --from=kit-builder /usr/local/bin/mqc-kit /usr/local/bin/mqc-kit
USER 10001:10001
ENTRYPOINT ["mqc-kit"]
CMD ["--help"]

# ---- runtime: the daemon's image -------------------------------------------------------------
FROM runtime-base AS runtime

COPY --from=builder /usr/local/bin/mq-cutover /usr/local/bin/mq-cutover
# The example config, so that the image starts with no mount at all (it then points at
# 127.0.0.1 and will not get ready); mount your own over it.
COPY config/mq-cutover.toml /etc/mq-cutover/mq-cutover.toml

USER 10001:10001

# The admin listener ([admin] listen): /metrics, /healthz, /readyz and the operator API. The
# config must listen on 0.0.0.0:9464 (not the default 127.0.0.1) to be reachable from outside.
EXPOSE 9464

# Liveness only: /readyz also fails while Redis is away or the sink's circuit is open, which a
# restart would not fix.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:9464/healthz"]

# The daemon drains in-flight calls on SIGTERM (pipeline.drain_timeout); give `docker stop` a
# longer --time than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["mq-cutover"]
CMD ["run", "--config", "/etc/mq-cutover/mq-cutover.toml"]
