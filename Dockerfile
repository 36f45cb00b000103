# The observer's image, for those who build with Docker:
#   docker build -t observer:0.1.0 .
# Without a Docker engine, `cargo xtask image` builds the same image with
# buildah (FROM scratch, plus glibc's libraries) and checks it.

# Build: `cargo xtask setup` installs the eBPF toolchain (a nightly with
# rust-src, or Debian's rustc-web, and bpf-linker) as it does on a dev VM.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo xtask setup && cargo build --release --package observer

# Run: glibc and libgcc, nothing else (no shell, no package manager).
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/observer /observer
USER 0:0
ENTRYPOINT ["/observer"]
CMD ["run"]
