# Images for docker-compose.yml: the controller and the demo upstream.
# The filter (.wasm) is built on the host with `make wasm` and mounted into the Envoy image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sluice-controller -p sluice-cli -p sluice-e2e --bins

FROM debian:bookworm-slim AS controller
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/sluice-controller /usr/local/bin/sluice-controller
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
COPY controller/demo-rules.toml /etc/sluice/rules.toml
ENV SLUICE_LISTEN=0.0.0.0:8081 \
    SLUICE_ADMIN_LISTEN=0.0.0.0:8082 \
    SLUICE_CONFIG=/etc/sluice/rules.toml
EXPOSE 8081 8082
USER 65532:65532
ENTRYPOINT ["sluice-controller"]

FROM debian:bookworm-slim AS demo-upstream
COPY --from=build /src/target/release/sluice-demo-upstream /usr/local/bin/sluice-demo-upstream
EXPOSE 8080
USER 65532:65532
ENTRYPOINT ["sluice-demo-upstream", "0.0.0.0:8080"]
