package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/ops"
	"github.com/outbox-relay/outbox-relay/relay"
)

// statusTopTypes is how many event types status lists, by pending count.
const statusTopTypes = 20

// statusReport is what status prints; --json prints it as is.
type statusReport struct {
	Table      string    `json:"table"`
	ObservedAt time.Time `json:"observed_at"` // the database's now()

	// SchemaVersion is nil when goose's version table is missing.
	SchemaVersion *int64 `json:"schema_version"`
	SchemaLatest  int64  `json:"schema_latest"`  // newest migration this binary carries
	NotifyTrigger string `json:"notify_trigger"` // enabled, disabled or missing

	Pending int64 `json:"pending"`
	DueNow  int64 `json:"due_now"`
	// OldestPendingAgeSeconds is nil when nothing is pending.
	OldestPendingAgeSeconds *float64 `json:"oldest_pending_age_seconds"`
	Dead                    int64    `json:"dead"`

	Dispatched dispatchCounts `json:"dispatched"`

	EventTypes      []typeCounts `json:"event_types"`       // top statusTopTypes by pending
	EventTypesTotal int64        `json:"event_types_total"` // types with pending or dead rows

	// Partitions is set in ordered mode (relay.ordering: partition_key):
	// which replica leases which partitions, and their backlogs.
	Partitions *partitionStatus `json:"partitions,omitempty"`
}

// partitionStatus is the lease ownership of ordered mode.
type partitionStatus struct {
	Count   int              `json:"count"` // relay.partitions
	Owners  []partitionOwner `json:"owners"`
	Pending map[int32]int64  `json:"pending_by_partition"` // keyed pending rows
	// Unowned lists partitions no replica holds (none while relays run).
	Unowned []int32 `json:"unowned"`
}

type partitionOwner struct {
	Owner           string    `json:"owner"` // the replica: host/pid/random
	PID             int32     `json:"pid"`
	ApplicationName string    `json:"application_name"`
	ClientAddr      string    `json:"client_addr"`
	Since           time.Time `json:"since"`
	Partitions      []int32   `json:"partitions"`
	Pending         int64     `json:"pending"`
}

// dispatchCounts are rows marked dispatched recently, counted in the
// archive of dispatched rows.
type dispatchCounts struct {
	LastMinute   int64 `json:"last_minute"`
	Last5Minutes int64 `json:"last_5_minutes"`
	// Exact is false when dispatched rows are not kept at all.
	Exact bool   `json:"exact"`
	Note  string `json:"note,omitempty"`
}

type typeCounts struct {
	EventType string `json:"event_type"`
	Pending   int64  `json:"pending"`
	Dead      int64  `json:"dead"`
}

const statusLong = `Shows the outbox table's backlog (pending rows, due now, oldest due row's age),
dead rows, rows dispatched in the last minute and 5 minutes, pending and dead
counts of the top 20 event types, the schema version and the NOTIFY trigger.
All numbers come from one consistent snapshot; status never writes.

Pending and dead counts read the partial indexes: cheap while dead rows are
few, proportional to the backlog otherwise. Dispatched counts read the
archive of dispatched rows through its BRIN index on dispatched_at; rows
marked dispatched in place in the outbox table (before migration 6, or by an
older relay) are not counted. With relay.on_dispatch: delete, dispatched rows
are not kept: status says so (pass the relay's --config). The relay's metrics give exact rates
(outbox_relay_events_published_total).
`

// statusFlags are status's flags.
type statusFlags struct {
	json bool
}

func (c *cliEnv) cmdStatus(ctx context.Context, o statusFlags) error {
	cfg, err := c.loadConfig("postgres.")
	if err != nil {
		return err
	}
	conn, out, err := connectOutbox(ctx, cfg)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))

	st, err := out.Status(ctx, conn, ops.StatusOptions{
		KeepDispatched: cfg.Relay.OnDispatch != relay.OnDispatchDelete,
		Partitions:     partitionsIfOrdered(cfg.Relay),
		TopTypes:       statusTopTypes,
	})
	if err != nil {
		return fmt.Errorf("status of %s: %w", out.Table(), err)
	}
	rep := reportOf(st)
	if o.json {
		return writeJSON(c.stdout, rep)
	}
	return printStatus(c.stdout, rep, cfg.Wake.Mode)
}

// partitionsIfOrdered is relay.partitions in ordered mode, else 0.
func partitionsIfOrdered(e relay.EngineConfig) int {
	if e.Ordering == relay.OrderingPartitionKey {
		return e.Partitions
	}
	return 0
}

// reportOf is st in the form status prints, with each replica's share of
// the keyed backlog.
func reportOf(st ops.Status) statusReport {
	rep := statusReport{Table: st.Table, ObservedAt: st.ObservedAt, SchemaVersion: st.SchemaVersion,
		SchemaLatest: st.SchemaLatest, NotifyTrigger: st.NotifyTrigger, Pending: st.Pending, DueNow: st.DueNow,
		OldestPendingAgeSeconds: st.OldestPendingAgeSeconds, Dead: st.Dead,
		Dispatched: dispatchCounts(st.Dispatched), EventTypes: []typeCounts{}, EventTypesTotal: st.EventTypesTotal}
	for _, tc := range st.EventTypes {
		rep.EventTypes = append(rep.EventTypes, typeCounts(tc))
	}
	if ps := st.Partitions; ps != nil {
		rep.Partitions = &partitionStatus{Count: ps.Count, Owners: []partitionOwner{}, Pending: ps.Pending, Unowned: ps.Unowned}
		for _, o := range ps.Owners {
			po := partitionOwner{Owner: o.Owner, PID: o.PID, ApplicationName: o.ApplicationName, ClientAddr: o.ClientAddr,
				Since: o.Since, Partitions: o.Partitions}
			for _, p := range o.Partitions {
				po.Pending += ps.Pending[p]
			}
			rep.Partitions.Owners = append(rep.Partitions.Owners, po)
		}
	}
	return rep
}

// ranges writes sorted partitions compactly: 0-3,8,10-11.
func ranges(ps []int32) string {
	var b strings.Builder
	for i := 0; i < len(ps); {
		j := i
		for j+1 < len(ps) && ps[j+1] == ps[j]+1 {
			j++
		}
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		if j > i {
			fmt.Fprintf(&b, "%d-%d", ps[i], ps[j])
		} else {
			fmt.Fprintf(&b, "%d", ps[i])
		}
		i = j + 1
	}
	if b.Len() == 0 {
		return "-"
	}
	return b.String()
}

func printStatus(w io.Writer, rep statusReport, wakeMode string) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	line := func(key, format string, args ...any) { fmt.Fprintf(tw, key+":\t"+format+"\n", args...) }

	line("table", "%s", rep.Table)
	switch v := rep.SchemaVersion; {
	case v == nil:
		line("schema version", "unknown: no version table (run `outbox-relay migrate up`)")
	case *v < rep.SchemaLatest:
		line("schema version", "%d, behind the latest %d (run `outbox-relay migrate up`)", *v, rep.SchemaLatest)
	case *v > rep.SchemaLatest:
		line("schema version", "%d, newer than this binary knows (%d): upgrade it", *v, rep.SchemaLatest)
	default:
		line("schema version", "%d (latest)", *v)
	}
	trigger := rep.NotifyTrigger
	if wakeMode == relay.WakeNotify && trigger != "enabled" {
		trigger += " (wake.mode is notify: run `outbox-relay notify enable`)"
	}
	line("notify trigger", "%s", trigger)
	line("pending", "%d (%d due now)", rep.Pending, rep.DueNow)
	if rep.OldestPendingAgeSeconds != nil {
		line("oldest pending", "%s", formatAge(time.Duration(*rep.OldestPendingAgeSeconds*float64(time.Second))))
	} else {
		line("oldest pending", "-")
	}
	line("dead", "%d", rep.Dead)
	d := rep.Dispatched
	note := ""
	if d.Note != "" {
		note = " (" + d.Note + ")"
	}
	line("dispatched", "%d in the last minute, %d in the last 5 minutes%s", d.LastMinute, d.Last5Minutes, note)
	if err := tw.Flush(); err != nil {
		return err
	}

	if err := printPartitions(w, rep.Partitions); err != nil {
		return err
	}
	if len(rep.EventTypes) == 0 {
		fmt.Fprintln(w, "event types: none pending or dead")
		return nil
	}
	title := "event types"
	if rep.EventTypesTotal > int64(len(rep.EventTypes)) {
		title = fmt.Sprintf("event types (top %d of %d by pending)", len(rep.EventTypes), rep.EventTypesTotal)
	}
	fmt.Fprintf(w, "\n%s:\n", title)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  TYPE\tPENDING\tDEAD")
	for _, tc := range rep.EventTypes {
		fmt.Fprintf(tw, "  %s\t%d\t%d\n", cell(tc.EventType, 60), tc.Pending, tc.Dead)
	}
	return tw.Flush()
}

func printPartitions(w io.Writer, ps *partitionStatus) error {
	if ps == nil {
		return nil
	}
	fmt.Fprintf(w, "\npartitions (ordering: partition_key, %d partitions, %d replicas):\n", ps.Count, len(ps.Owners))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  OWNER PID\tAPPLICATION\tADDRESS\tSINCE\tPARTITIONS\tPENDING")
	for _, o := range ps.Owners {
		addr := o.ClientAddr
		if addr == "" {
			addr = "local"
		}
		fmt.Fprintf(tw, "  %d\t%s\t%s\t%s\t%s\t%d\n", o.PID, cell(o.ApplicationName, 30), addr,
			o.Since.UTC().Format(time.RFC3339), ranges(o.Partitions), o.Pending)
	}
	if len(ps.Unowned) > 0 {
		var pending int64
		for _, p := range ps.Unowned {
			pending += ps.Pending[p]
		}
		fmt.Fprintf(tw, "  unowned\t-\t-\t-\t%s\t%d\n", ranges(ps.Unowned), pending)
	}
	return tw.Flush()
}
