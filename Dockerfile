# syntax=docker/dockerfile:1
#
# outbox-relay as a small static image: a Go builder stage, then the binary
# alone on distroless/static (CA certificates, tzdata, /etc/passwd with the
# nonroot user; no shell, no package manager).
#
#   docker build -t outbox-relay:dev \
#     --build-arg VERSION="$(git describe --tags --always --dirty)" \
#     --build-arg COMMIT="$(git rev-parse --short HEAD)" .
#
#   docker run --rm -p 9464:9464 \
#     -e OUTBOX_RELAY_POSTGRES_DSN='postgres://outbox_relay:...@db:5432/app?sslmode=verify-full&sslrootcert=/etc/outbox-relay/tls/db-ca.pem' \
#     -e OUTBOX_RELAY_AMQP_URL='amqps://outbox_relay:...@broker:5671/' \
#     -e OUTBOX_RELAY_AMQP_EXCHANGE=app.events \
#     outbox-relay:dev
#
# The default command reads /etc/outbox-relay/config.yaml: the image ships an
# empty one, so the environment alone can configure the relay; mount your own
# file there (a ConfigMap, a bind mount) for everything else. Migrations are a
# separate step: `docker run ... outbox-relay:dev migrate up` (see
# docs/operations.md, "Upgrading the schema").

# The Go minor release must be at least go.mod's go line (the floor for
# applications importing outbox); the tag follows the
# newest patch release of that minor.
ARG GO_VERSION=1.26

FROM golang:${GO_VERSION} AS build
WORKDIR /src
# Modules first, so that a source change does not download them again.
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod \
    go mod download
COPY . .
ARG VERSION=dev
ARG COMMIT=unknown
# CGO_ENABLED=0: a static binary that runs on distroless/static (or scratch).
# -trimpath and -s -w: reproducible paths, no symbol table or DWARF.
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}" \
      -o /out/outbox-relay ./cmd/outbox-relay \
 && mkdir -p /out/etc \
 && printf '%s\n' \
      '# outbox-relay configuration: every key is listed in config.example.yaml.' \
      '# This file is empty on purpose: set the required keys by environment' \
      '# (OUTBOX_RELAY_POSTGRES_DSN, OUTBOX_RELAY_AMQP_URL, OUTBOX_RELAY_AMQP_EXCHANGE)' \
      '# or mount your own file over /etc/outbox-relay/config.yaml.' \
      > /out/etc/config.yaml

FROM gcr.io/distroless/static-debian12:nonroot
ARG VERSION=dev
ARG COMMIT=unknown
LABEL org.opencontainers.image.title="outbox-relay" \
      org.opencontainers.image.description="Transactional outbox relay: PostgreSQL outbox table to RabbitMQ" \
      org.opencontainers.image.source="https://github.com/outbox-relay/outbox-relay" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${COMMIT}"
COPY --from=build /out/outbox-relay /outbox-relay
COPY --from=build /out/etc/config.yaml /etc/outbox-relay/config.yaml
# distroless's nonroot user, by number: Kubernetes' runAsNonRoot can only
# verify a numeric user.
USER 65532:65532
# metrics.addr default: /metrics, /healthz (liveness), /readyz (readiness).
EXPOSE 9464
# No HEALTHCHECK: distroless has no shell, curl or wget to run one, and the
# binary has no health subcommand. Kubernetes probes /healthz and /readyz over
# HTTP (deploy/k8s); elsewhere, scrape or probe port 9464 from outside.
ENTRYPOINT ["/outbox-relay"]
CMD ["run", "--config", "/etc/outbox-relay/config.yaml"]
