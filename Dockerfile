# Images for docker-compose.yml: the controller and the demo upstream.
# The filter (.wasm) is built on the host with `make wasm` and mounted into the Envoy image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The commit the controller reports (`sluice_build_info`, GET /v1/admin/build): this build
# context has no .git, so pass it: `docker build --build-arg SLUICE_COMMIT=$(git rev-parse --short=12 HEAD)`.
ARG SLUICE_COMMIT=unknown
RUN SLUICE_COMMIT=$SLUICE_COMMIT cargo build --release --locked -p sluice-controller -p sluice-cli -p sluice-e2e --bins

# The controller on a minimal base (glibc and libgcc, no shell, no package manager), running
# as the base's non-root user. No configuration is built in: give one (--config /
# SLUICE_CONFIG, mounted from a ConfigMap or a volume) or keep it in the store. In
# production mode, the default, the controller refuses to start without a store that keeps
# the configuration (--redis-url or --state-file), naming the flags.
FROM gcr.io/distroless/cc-debian12:nonroot AS controller
COPY --from=build /src/target/release/sluice-controller /usr/local/bin/sluice-controller
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
ENV SLUICE_LISTEN=0.0.0.0:8081 \
    SLUICE_ADMIN_LISTEN=0.0.0.0:8082
EXPOSE 8081 8082
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sluice-controller"]

FROM debian:bookworm-slim AS demo-upstream
COPY --from=build /src/target/release/sluice-demo-upstream /usr/local/bin/sluice-demo-upstream
EXPOSE 8080
USER 65532:65532
ENTRYPOINT ["sluice-demo-upstream", "0.0.0.0:8080"]
