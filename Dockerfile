# syntax=docker/dockerfile:1
# Isthmus: `isthmus` (controller, gateway, CLI, sample app) and the
# sidecar-only `isthmus-proxy`, in one small image.
#   docker build -t isthmus:dev .
# The controller and gateway run as UID 1000, the sidecar as UID 1337
# (the UID traffic capture exempts); every container of deploy/ runs with
# a read-only root filesystem.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin isthmus --bin isthmus-proxy \
 && install -D -m 0755 target/release/isthmus /out/isthmus \
 && install -D -m 0755 target/release/isthmus-proxy /out/isthmus-proxy

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/isthmus /out/isthmus-proxy /usr/local/bin/
USER 1000:1000
ENTRYPOINT ["/usr/local/bin/isthmus"]
