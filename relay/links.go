package relay

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/outbox-relay/outbox-relay/metrics"
	"go.uber.org/zap"
)

// setLink records a link's state; it logs and counts only state changes.
func (r *Relay) setLink(link string, err error) {
	r.mu.Lock()
	prev, known := r.links[link]
	r.links[link] = err
	r.mu.Unlock()
	wasUp := known && prev == nil
	first := !known || prev == errNotConnected
	switch {
	case err == nil && !wasUp:
		r.m.LinkUp.WithLabelValues(link).Set(1)
		if first {
			r.log.Info("link up", zap.String("link", link))
		} else {
			r.m.Reconnects.WithLabelValues(link).Inc()
			r.log.Info("link restored", zap.String("link", link))
		}
	case err != nil && (wasUp || first):
		// Once when an up link fails, and once when a link cannot be
		// established at start; not again for every retry.
		r.m.LinkUp.WithLabelValues(link).Set(0)
		fields := []zap.Field{zap.String("link", link), zap.Bool("never_up", first), zap.String("error", Redact(err.Error()))}
		if hint := tlsHint(link, err); hint != "" {
			fields = append(fields, zap.String("hint", hint))
		}
		r.log.Warn("link down", fields...)
	}
}

// Ready reports nil while every link is up and the claim loop is not stuck.
func (r *Relay) Ready() error {
	r.mu.Lock()
	var errs []error
	for link, err := range r.links {
		if err != nil {
			errs = append(errs, &NotReady{Reason: link + " link down", Err: fmt.Errorf("%s: %s", link, Redact(err.Error()))})
		}
	}
	r.mu.Unlock()
	stuckAfter := 2*r.cfg.AMQP.ConfirmTimeout + r.cfg.Wake.PollInterval + time.Minute
	if last := time.Unix(0, r.lastLoop.Load()); r.started.Load() && time.Since(last) > stuckAfter {
		errs = append(errs, &NotReady{Reason: "claim loop stuck", Err: fmt.Errorf("claim loop stuck since %s", last.Format(time.RFC3339))})
	}
	return errors.Join(errs...)
}

// Live reports nil unless, in ordered mode, the claim loop has made no
// progress for relay.lease_timeout: its partition leases have lapsed and
// only a restart can be trusted to fix whatever holds it (/healthz).
func (r *Relay) Live() error {
	if r.cfg.Relay.Ordering != OrderingPartitionKey || !r.started.Load() {
		return nil
	}
	if last := time.Unix(0, r.lastLoop.Load()); time.Since(last) > r.cfg.Relay.LeaseTimeout {
		return fmt.Errorf("%w since %s (relay.lease_timeout %s): its partition leases have lapsed",
			errNotLive, last.Format(time.RFC3339), r.cfg.Relay.LeaseTimeout)
	}
	return nil
}

// errNotLive is Live's answer while the claim loop is stuck.
var errNotLive = errors.New("claim loop stuck")

// errNotConnected is every link's state before its first attempt.
var errNotConnected = errors.New("not connected yet")

// pgFailed records a database error on the postgres link; an error caused by
// the relay's own shutdown (a cancelled context) is not a link failure.
func (r *Relay) pgFailed(err error) error {
	if !errors.Is(err, context.Canceled) {
		r.setLink(metrics.LinkPostgres, err)
	}
	return err
}
