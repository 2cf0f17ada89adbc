package rabbitmq

import (
	"fmt"
	"slices"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/relay"
)

// route returns the exchange and routing key of m: the row's overrides, or
// amqp.exchange and the event type. An exchange that amqp.exchanges does not
// list fails the message for good: publishing to an exchange that may not
// exist would let the broker close the channel under the whole batch.
func (p *Publisher) route(m *relay.Message) (exchange, key string, err error) {
	exchange, key = p.cfg.Exchange, m.Type
	if m.RoutingKey != "" {
		key = m.RoutingKey
	}
	if m.Exchange == "" || m.Exchange == p.cfg.Exchange {
		return exchange, key, nil
	}
	if !slices.Contains(p.cfg.Exchanges, m.Exchange) {
		return "", "", &relay.PublishError{Reason: relay.ReasonInvalid, Err: fmt.Errorf(
			"exchange %q is not listed in amqp.exchanges (%q): add it there, then `outbox-relay dead retry`", m.Exchange, p.cfg.Exchanges)}
	}
	return m.Exchange, key, nil
}

// declareRouted declares (or, with amqp.declare_exchange false, checks) the
// exchanges of amqp.exchanges on ch, as ensure does amqp.exchange: a listed
// exchange that is missing keeps the link down, naming it, instead of
// closing the channel at every batch that names it.
func (p *Publisher) declareRouted(ch *amqp.Channel) error {
	for _, x := range p.cfg.Exchanges {
		if *p.cfg.DeclareExchange {
			if err := ch.ExchangeDeclare(x, p.cfg.ExchangeType, true, false, false, false, nil); err != nil {
				return fmt.Errorf("declare exchange %q of amqp.exchanges (set amqp.declare_exchange: false if it is managed elsewhere): %w", x, err)
			}
		} else if err := ch.ExchangeDeclarePassive(x, p.cfg.ExchangeType, true, false, false, false, nil); err != nil {
			return fmt.Errorf("exchange %q of amqp.exchanges not found (amqp.declare_exchange is false: declare it on the broker, or remove it from amqp.exchanges): %w", x, err)
		}
	}
	return nil
}
