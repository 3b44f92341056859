# The proxy and its simulated upstream: one static-ish binary on a slim Debian.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# A workspace member: cargo reads its manifest even when only the proxy is built.
COPY bench ./bench
# Served at /openapi.yaml: compiled into the binary.
COPY openapi.yaml ./
RUN cargo build --release --locked --bin discount-proxy

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home discount-proxy
COPY --from=build /src/target/release/discount-proxy /usr/local/bin/discount-proxy
COPY config /etc/discount-proxy
USER discount-proxy
EXPOSE 8080
ENTRYPOINT ["discount-proxy"]
CMD ["serve", "--config", "/etc/discount-proxy/production.example.toml"]
