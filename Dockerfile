# Switchboard container image.
#
#   docker build -t switchboard .
#   docker run -p 8080:8080 -e JWT_SECRET="$(openssl rand -base64 48)" switchboard

# --- build -------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder

RUN apt-get update \
    && apt-get install -y --no-install-recommends libpq-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# Dependencies first, against placeholder sources, so that this layer is rebuilt only when
# Cargo.toml or Cargo.lock change. .cargo/config.toml sets how the bundled SQLite is built.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin switchboard \
    && rm -rf src

COPY build.rs ./
COPY src src
COPY config config
COPY migrations migrations
# COPY keeps the files' own times, which can be older than the placeholder build: touch them
# so cargo rebuilds the crate itself.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin switchboard

# --- run ---------------------------------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends libpq5 ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --system --user-group --home-dir /app --shell /usr/sbin/nologin switchboard

WORKDIR /app
COPY --from=builder /src/target/release/switchboard /usr/local/bin/switchboard
COPY config /app/config
# The SQLite default (sqlite://data/chat_history.db) lives here; mount a volume to keep it.
# /app/backend is the name the operators' runbooks call the binary by
# (`docker-compose exec backend ./backend -check-db`).
RUN mkdir -p /app/data && chown switchboard:switchboard /app/data \
    && ln -s /usr/local/bin/switchboard /app/backend

USER switchboard

ENV APP_ENV=production HOST=0.0.0.0 PORT=8080
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${PORT}/health" || exit 1

ENTRYPOINT ["switchboard"]
CMD ["serve"]
