package relay_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest/observer"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/metrics"
)

// TestTLSBothLinks checks that a relay connects to PostgreSQL with
// sslmode=verify-full and to RabbitMQ with amqps://, both trusting a CA made
// for the test and presenting client certificates, and delivers; and that
// with another CA, or a certificate for another host name (PostgreSQL) or
// a server_name_indication it does not hold (RabbitMQ), it refuses the
// link, saying why and what to change, and publishes nothing.
func TestTLSBothLinks(t *testing.T) {
	t.Parallel()
	certs := testenv.NewTLS(t, "postgres")
	stranger := testenv.NewTLS(t, "postgres") // a CA neither server uses
	elsewhere := testenv.NewTLSFor(t, "postgres", "db.example.internal")
	pg := testenv.StartPostgresWith(t, testenv.PostgresOptions{TLS: certs})
	pgElsewhere := testenv.StartPostgresWith(t, testenv.PostgresOptions{TLS: elsewhere})
	rmq := testenv.StartRabbitMQWith(t, testenv.RabbitMQOptions{TLS: certs})
	dsn := func(pg *testenv.Postgres, certs *testenv.TLS, ca string) string {
		return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/test?sslmode=verify-full&sslrootcert=%s&sslcert=%s&sslkey=%s",
			pg.Port(), ca, certs.ClientCert, certs.ClientKey)
	}
	good := dsn(pg, certs, certs.CA)
	o := testenv.NewOutboxAt(t, good)
	b := testenv.NewBrokerAt(t, rmq.TLSURL(certs.CA))
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	want := o.WriteEvents(t, "lesson.published", 100)

	const wrongCA = "certificate signed by unknown authority"
	for _, tc := range []struct {
		name, link   string
		pg, amqp     string
		err          string // in the logged error
		hint1, hint2 string // in the logged hint: what to change
	}{
		{"wrong CA", metrics.LinkPostgres, dsn(pg, certs, stranger.CA), rmq.TLSURL(certs.CA), wrongCA, "sslrootcert", ""},
		{"wrong CA", metrics.LinkAMQP, good, rmq.TLSURL(stranger.CA), wrongCA, "cacertfile", ""},
		{"certificate for another host", metrics.LinkPostgres, dsn(pgElsewhere, elsewhere, elsewhere.CA), rmq.TLSURL(certs.CA),
			"x509: cannot validate certificate for 127.0.0.1", "does not name the host in postgres.dsn", "reissue the certificate"},
		{"server_name_indication it does not hold", metrics.LinkAMQP, good, rmq.TLSURL(certs.CA) + "&server_name_indication=mq.example.internal",
			"x509: certificate is valid for localhost, not mq.example.internal", "does not name the host in amqp.url", "set server_name_indication"},
	} {
		cfg := config(o, b)
		cfg.Postgres.DSN, cfg.AMQP.URL = tc.pg, tc.amqp
		r, logs := startObserved(t, cfg)
		var down []observer.LoggedEntry
		testenv.Eventually(t, 30*time.Second, tc.link+" link down: "+tc.name, func() bool {
			down = logs.FilterMessage("link down").FilterFieldKey("hint").All()
			return len(down) > 0
		})
		fields := down[0].ContextMap()
		hint := fmt.Sprint(fields["hint"])
		if fields["link"] != tc.link || !strings.Contains(fmt.Sprint(fields["error"]), tc.err) ||
			!strings.Contains(hint, tc.hint1) || !strings.Contains(hint, tc.hint2) {
			t.Errorf("%s for %s: logged %v, want link %s, an error with %q and a hint with %q and %q", tc.name, tc.link, fields, tc.link, tc.err, tc.hint1, tc.hint2)
		}
		if err := r.Ready(); err == nil {
			t.Errorf("%s for %s: the relay says it is ready", tc.name, tc.link)
		}
		if err := r.Stop(); err != nil {
			t.Fatal(err)
		}
		if n := o.Count(t, "dispatched_at IS NOT NULL"); n != 0 {
			t.Fatalf("%s for %s: %d events dispatched", tc.name, tc.link, n)
		}
	}

	start(t, config(o, b))
	if dups := testenv.ReceiveAll(t, deliveries, want, 30*time.Second); dups != 0 {
		t.Logf("%d duplicates (allowed)", dups)
	}
	// The relay's database sessions are encrypted, with its certificate.
	var tlsSessions int
	err := o.Pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
		WHERE a.application_name = 'outbox-relay' AND s.ssl AND s.client_dn = '/CN=postgres'`).Scan(&tlsSessions)
	if err != nil {
		t.Fatal(err)
	}
	if tlsSessions == 0 {
		t.Error("no TLS session with a client certificate from the relay in pg_stat_ssl")
	}
}
