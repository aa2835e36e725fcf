# syntax=docker/dockerfile:1
# tailnode operator image: a release build on Debian bookworm, run as non-root on
# distroless/cc (glibc and CA certificates, no shell). Needs BuildKit (cache mounts).
#
#   docker build -t tailnode/tailnode:dev .

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# Cargo.toml declares [[bench]] targets, so their sources must exist for the manifest to load.
COPY benches ./benches
COPY src ./src
# The registry and target/ are cache mounts: a rebuild reuses the compiled dependencies.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tailnode \
    && install -D -m 0755 target/release/tailnode /out/tailnode

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/tailnode /tailnode
# The distroless `nonroot` user, numerically (the chart's runAsUser/runAsGroup; lets the kubelet
# verify runAsNonRoot).
USER 65532:65532
# 8080: /healthz, /readyz, /metrics; 8443: the admission webhook (HTTPS).
EXPOSE 8080 8443
ENTRYPOINT ["/tailnode"]
CMD ["run"]
