package relay

import (
	"strings"

	"github.com/outbox-relay/outbox-relay/metrics"
)

// tlsHint says what to check when a link failed because the server's
// certificate did not verify, or "" for other errors. The relay keeps
// retrying (a certificate being rotated may verify again), so the hint goes
// with the link-down log line.
func tlsHint(link string, err error) string {
	msg := err.Error()
	if !strings.Contains(msg, "x509: ") && !strings.Contains(msg, "tls: ") {
		return ""
	}
	switch link {
	case metrics.LinkAMQP:
		return "TLS to the broker failed: its certificate must verify against cacertfile in amqp.url (the system's CA roots without it) and name the URL's host (or server_name_indication); certfile and keyfile give the client certificate"
	default:
		return "TLS to PostgreSQL failed: with sslmode=verify-full its certificate must verify against sslrootcert in postgres.dsn and name the DSN's host; sslcert and sslkey give the client certificate"
	}
}
