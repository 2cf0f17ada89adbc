// Package amqpconn opens a RabbitMQ connection and a channel on it, for the
// tools and tests that talk to the broker directly rather than through the
// relay's publisher (relay/rabbitmq).
package amqpconn

import (
	"fmt"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/relay"
)

// Dial connects to url with cfg. Its error names the server with the
// password redacted, from the URL and from the library's message.
func Dial(url string, cfg amqp.Config) (*amqp.Connection, error) {
	conn, err := amqp.DialConfig(url, cfg)
	if err != nil {
		return nil, fmt.Errorf("amqp dial %s: %s", relay.RedactURL(url), relay.Redact(err.Error()))
	}
	return conn, nil
}

// Channel is Dial with a channel opened on the new connection. On error
// nothing is left open; closing the connection closes the channel too.
func Channel(url string, cfg amqp.Config) (*amqp.Connection, *amqp.Channel, error) {
	conn, err := Dial(url, cfg)
	if err != nil {
		return nil, nil, err
	}
	ch, err := conn.Channel()
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("amqp channel: %w", err)
	}
	return conn, ch, nil
}
