# servicebusdemo: one image, three roles (OPERATION_MODE=producer|consumer|scaler).
#
#   docker build -t servicebusdemo .          (or: podman build -t servicebusdemo .)
#
# Stage 1 compiles only the product package of the workspace, in release mode; stage 2 is distroless `cc`
# (glibc, libgcc and the CA bundle the TLS roots are read from; no shell, no package manager) running as the
# non-root user 65532. The cache mounts need BuildKit (docker's default builder) or buildah/podman.

ARG RUST_VERSION=1.88
FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /src
# The whole workspace is needed to resolve it (members' manifests, Cargo.lock); .dockerignore keeps build
# outputs, virtualenvs and node_modules out of the context.
COPY . .
# The cache mounts keep the registry and the target directory between builds; the binary is copied out of
# the cached target directory because cache mounts are not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p servicebusdemo --bin servicebusdemo \
    && install -D -m 0755 target/release/servicebusdemo /out/servicebusdemo

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="servicebusdemo" \
      org.opencontainers.image.description="Azure Service Bus producer, consumer and KEDA external scaler with workload identity" \
      org.opencontainers.image.licenses="MIT"
COPY --from=builder /out/servicebusdemo /usr/local/bin/servicebusdemo
# Numeric, so Kubernetes can verify runAsNonRoot without a runAsUser in the pod.
USER 65532:65532
# 8080: /metrics, /healthz, /readyz (METRICS_ADDR); 6000: the KEDA external scaler's gRPC (SCALER_GRPC_ADDR).
EXPOSE 8080 6000
ENTRYPOINT ["/usr/local/bin/servicebusdemo"]
