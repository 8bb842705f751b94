# The router as a container: built in a full Rust image, run from a slim Debian one as a
# non-root user. `docker build -t cascade-router .` (or podman / buildah); the cascade file is
# mounted at /etc/cascade-router/cascade.yaml (the Kubernetes manifests in deploy/k8s do).

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so a change to the router's own code rebuilds only the router.
COPY Cargo.toml Cargo.lock build.rs ./
COPY devtools/Cargo.toml devtools/Cargo.toml
COPY proto proto
RUN mkdir -p src devtools/src benches \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > devtools/src/main.rs && touch devtools/src/lib.rs \
 && echo 'fn main() {}' > benches/hot_paths.rs \
 && cargo build --release --locked -p cascade-router \
 && rm -rf src devtools/src benches
COPY src src
COPY benches benches
COPY devtools devtools
RUN touch src/main.rs src/lib.rs && cargo build --release --locked -p cascade-router \
 && strip target/release/cascade-router

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home cascade \
 && mkdir -p /etc/cascade-router
COPY --from=build /src/target/release/cascade-router /usr/local/bin/cascade-router
COPY cascade.yaml /etc/cascade-router/cascade.yaml
USER 10001
# gRPC, the OpenAI-compatible HTTP front and status page, Prometheus metrics.
EXPOSE 50051 8088 9464
ENTRYPOINT ["/usr/local/bin/cascade-router"]
CMD ["serve", "--config", "/etc/cascade-router/cascade.yaml"]
