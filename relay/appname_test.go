package relay_test

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// TestAppIDNamesHostAndTable checks that messages carry an app-id telling
// relays apart (host and table) by default, and amqp.app_id when set.
func TestAppIDNamesHostAndTable(t *testing.T) {
	t.Parallel()
	host, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ set, want string }{
		{"", "outbox-relay/" + host + "/"},
		{"orders-service", "orders-service"},
	} {
		o, b := testenv.NewOutbox(t), testenv.NewBroker(t)
		deliveries := b.Consume(t, b.Queue(t, "#", nil))
		cfg := config(o, b)
		cfg.AMQP.AppID = tc.set
		start(t, cfg)
		w, _ := outbox.NewWriter(o.Schema, o.Table.Name)
		ctx := context.Background()
		if err := pgx.BeginFunc(ctx, o.Pool, func(tx pgx.Tx) error {
			return w.Write(ctx, tx, outbox.NewEvent("lesson.published", []byte(`{}`)))
		}); err != nil {
			t.Fatal(err)
		}
		want := tc.want
		if tc.set == "" {
			want += o.Schema + "." + o.Table.Name
		}
		if got := testenv.Receive(t, deliveries, 1, 10*time.Second)[0].AppId; got != want {
			t.Errorf("amqp.app_id %q: message app-id %q, want %q", tc.set, got, want)
		}
	}
}

// TestConnectionNameNamesHostAndTable checks that the relay's connection
// carries amqp.connection_name (default outbox-relay/<host>/<table>), which
// the broker's management UI and rabbitmqctl show for each connection.
func TestConnectionNameNamesHostAndTable(t *testing.T) {
	t.Parallel()
	host, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	rmq := testenv.StartRabbitMQ(t)
	o, b := testenv.NewOutbox(t), testenv.NewBrokerAt(t, rmq.URL())
	cfg := config(o, b)
	r := start(t, cfg)
	testenv.Eventually(t, 20*time.Second, "relay ready", func() bool { return r.Ready() == nil })
	want := `{"connection_name","outbox-relay/` + host + `/` + o.Schema + `.` + o.Table.Name + `"}`
	if out := rmq.Ctl(t, "list_connections", "client_properties"); !strings.Contains(out, want) {
		t.Errorf("no connection with %s:\n%s", want, out)
	}
}
