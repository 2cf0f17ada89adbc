package relay

import (
	"crypto/x509"
	"errors"
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
	var host x509.HostnameError
	// Some clients flatten the error to text: match x509's wording too.
	wrongHost := errors.As(err, &host) || strings.Contains(msg, "x509: certificate is valid for") ||
		strings.Contains(msg, "x509: cannot validate certificate for")
	switch {
	case link == metrics.LinkAMQP && wrongHost:
		return "TLS to the broker failed: its certificate does not name the host in amqp.url (or its server_name_indication); connect by a name the certificate holds, set server_name_indication in amqp.url to one, or reissue the certificate with this host among its subject alternative names"
	case link == metrics.LinkAMQP:
		return "TLS to the broker failed: its certificate must verify against cacertfile in amqp.url (the system's CA roots without it) and name the URL's host (or server_name_indication); certfile and keyfile give the client certificate"
	case wrongHost:
		return "TLS to PostgreSQL failed: its certificate does not name the host in postgres.dsn, as sslmode=verify-full requires; connect by a name the certificate holds or reissue the certificate with this host among its subject alternative names"
	default:
		return "TLS to PostgreSQL failed: with sslmode=verify-full its certificate must verify against sslrootcert in postgres.dsn and name the DSN's host; sslcert and sslkey give the client certificate"
	}
}
