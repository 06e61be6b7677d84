# NexusNode container image: a release build on the Rust image, copied into debian:bookworm-slim
# and run as an unprivileged user.
#
# glommio needs io_uring, which Docker 25 and later block in their default seccomp profile, and
# some locked memory: run the container with `--security-opt seccomp=deploy/seccomp-io-uring.json`
# and `--ulimit memlock=67108864:67108864`, as docker-compose.yml does.

FROM rust:1-bookworm AS build
WORKDIR /src
# The workspace manifest names the load generator and the benchmark, so the whole source tree is
# needed to resolve it; .dockerignore keeps build output and test dependencies out.
COPY . .
RUN cargo build --release --locked --bin nexus-node \
    && cp target/release/nexus-node /usr/local/bin/nexus-node

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin nexus
COPY --from=build /usr/local/bin/nexus-node /usr/local/bin/nexus-node
USER nexus
ENV NEXUS_LISTEN=0.0.0.0:3001
EXPOSE 3001
# /health answers 200 whenever the node serves clients, also while its cluster link is down
# ("status":"degraded"), so a Redis outage does not restart healthy nodes. bash's /dev/tcp
# keeps curl out of the image.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "port=${NEXUS_LISTEN##*:}; exec 3<>/dev/tcp/127.0.0.1/$port && printf 'GET /health HTTP/1.0\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["/usr/local/bin/nexus-node"]
