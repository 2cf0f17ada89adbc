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
// with another CA it refuses either link, saying why, and publishes nothing.
func TestTLSBothLinks(t *testing.T) {
	t.Parallel()
	certs := testenv.NewTLS(t, "postgres")
	stranger := testenv.NewTLS(t, "postgres") // a CA neither server uses
	pg := testenv.StartPostgresWith(t, testenv.PostgresOptions{TLS: certs})
	rmq := testenv.StartRabbitMQWith(t, testenv.RabbitMQOptions{TLS: certs})
	dsn := func(ca string) string {
		return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/test?sslmode=verify-full&sslrootcert=%s&sslcert=%s&sslkey=%s",
			pg.Port(), ca, certs.ClientCert, certs.ClientKey)
	}
	o := testenv.NewOutboxAt(t, dsn(certs.CA))
	b := testenv.NewBrokerAt(t, rmq.TLSURL(certs.CA))
	deliveries := b.Consume(t, b.Queue(t, "#", nil))
	want := writeEvents(t, o, "lesson.published", 100)

	for _, tc := range []struct {
		link     string
		pg, amqp string // the CA files trusted
		hint     string
	}{
		{metrics.LinkPostgres, stranger.CA, certs.CA, "sslrootcert"},
		{metrics.LinkAMQP, certs.CA, stranger.CA, "cacertfile"},
	} {
		cfg := config(o, b)
		cfg.Postgres.DSN, cfg.AMQP.URL = dsn(tc.pg), rmq.TLSURL(tc.amqp)
		r, logs := startObserved(t, cfg)
		var down []observer.LoggedEntry
		testenv.Eventually(t, 30*time.Second, tc.link+" link down over the wrong CA", func() bool {
			down = logs.FilterMessage("link down").FilterFieldKey("hint").All()
			return len(down) > 0
		})
		fields := down[0].ContextMap()
		if fields["link"] != tc.link || !strings.Contains(fmt.Sprint(fields["error"]), "certificate signed by unknown authority") ||
			!strings.Contains(fmt.Sprint(fields["hint"]), tc.hint) {
			t.Errorf("wrong CA for %s: logged %v, want link %s, the x509 error and a hint naming %s", tc.link, fields, tc.link, tc.hint)
		}
		if err := r.Ready(); err == nil {
			t.Errorf("wrong CA for %s: the relay says it is ready", tc.link)
		}
		if err := r.stop(); err != nil {
			t.Fatal(err)
		}
		if n := o.Count(t, "dispatched_at IS NOT NULL"); n != 0 {
			t.Fatalf("wrong CA for %s: %d events dispatched", tc.link, n)
		}
	}

	start(t, config(o, b))
	if dups := receiveAll(t, deliveries, want, 30*time.Second); dups != 0 {
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
