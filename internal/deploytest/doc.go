// Package deploytest checks the files that deploy outbox-relay (Dockerfile,
// .dockerignore, deploy/k8s, deploy/systemd, deploy/compose) and the
// operations runbook (docs/operations.md) against the code: every config key
// and OUTBOX_RELAY_* variable they name exists, ports and probe paths match
// the metrics endpoint, the YAML parses, the Dockerfile builds the real
// command as a non-root user, and the runbook's least-privilege grants are
// exactly enough to write events as the application and relay them as the
// relay. It has only tests; none needs Docker, and only the least-privilege
// test needs the shared PostgreSQL and RabbitMQ.
package deploytest
