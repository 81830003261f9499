# syntax=docker/dockerfile:1
#
# The image the Helm chart (helm/meshwork) runs: the four service binaries and meshctl, on a
# distroless runtime, as the non-root user 65532.
#
#   docker build -t meshwork:0.1.0 .
#
# Each pod runs one service: command ["/usr/local/bin/<users|auth|billing|orders>"], configured by
# the file named in MESHWORK_CONFIG and MESHWORK_* environment variables (see the chart).

# The toolchain CI tests with; edition 2024 needs at least 1.85.
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# protox compiles proto/ (no protoc needed); SQLite is bundled C; TLS is rustls (no OpenSSL).
# The caches speed up rebuilds; the binaries are copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p users -p auth -p billing -p orders -p meshctl \
    && mkdir -p /out/bin /out/data \
    && cp target/release/users target/release/auth target/release/billing \
          target/release/orders target/release/meshctl /out/bin/

# glibc and libgcc, CA certificates, a nonroot user (65532), no shell: Debian 12 like the builder.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/bin/ /usr/local/bin/
# Where a trial install keeps its SQLite files (the chart mounts a volume here).
COPY --from=build --chown=65532:65532 /out/data /var/lib/meshwork
USER 65532:65532
# 50051: the mesh port (mutual TLS); 9090: the admin port (health for probes, /metrics).
EXPOSE 50051 9090
LABEL org.opencontainers.image.title="meshwork" \
      org.opencontainers.image.description="Meshwork gRPC services: users, auth, billing, orders, and meshctl" \
      org.opencontainers.image.licenses="Apache-2.0"
CMD ["/usr/local/bin/meshctl", "--help"]
