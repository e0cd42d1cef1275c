# Build: docker build -t boxoffice .
# The dependency layer is cached: only changes to Cargo.toml/Cargo.lock rebuild it.
# No `# syntax=` line: BuildKit would pull a frontend image for it, which machines
# without a registry (see scripts/offline-images.sh) cannot.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# Build the dependencies against empty sources first, so that editing src/ reuses them.
RUN mkdir -p src/bin/rush \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/rush/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bins \
    && rm -rf src
COPY src src
COPY lua lua
COPY migrations migrations
# Cargo skips rebuilding when a file's mtime is older than the cached artifact.
RUN touch src/main.rs src/lib.rs src/bin/rush/main.rs \
    && cargo build --release --locked --bins

# glibc and libgcc only; no shell, no package manager, no build tools.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/boxoffice /usr/local/bin/boxoffice
COPY --from=build /src/target/release/rush /usr/local/bin/rush
USER 65532:65532
EXPOSE 3000
ENV BOXOFFICE_LISTEN=0.0.0.0:3000 BOXOFFICE_LOG_FORMAT=json
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/boxoffice", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/boxoffice"]
CMD ["serve"]
