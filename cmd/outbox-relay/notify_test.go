package main

import (
	"strings"
	"testing"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// TestNotifyCommand: enable, then disable, each reflected by notify status
// and by status; connection errors never print the password; a table that
// is not migrated is named with the way out.
func TestNotifyCommand(t *testing.T) {
	t.Parallel()
	o := testenv.NewOutbox(t)
	env := opsEnv(o)
	table := o.Schema + ".outbox"
	notify := func(action, want string) {
		t.Helper()
		code, out, errOut := runCLI(t, env, "notify", action)
		if code != 0 || out != want+"\n" {
			t.Fatalf("notify %s: exit %d, out %q, want %q; stderr %s", action, code, out, want, errOut)
		}
	}
	trigger := func(want string) {
		t.Helper()
		notify("status", "NOTIFY trigger on "+table+" is "+want)
		if rep := statusJSON(t, env); rep.NotifyTrigger != want {
			t.Fatalf("status reports the trigger %s, want %s", rep.NotifyTrigger, want)
		}
	}
	trigger("disabled") // the migration's default
	notify("enable", "NOTIFY trigger on "+table+" enabled")
	trigger("enabled")
	notify("disable", "NOTIFY trigger on "+table+" disabled")
	trigger("disabled")

	// A failed connection does not print the password of the DSN.
	bad := []string{"OUTBOX_RELAY_POSTGRES_DSN=postgres://relay:hunter2@127.0.0.1:1/db?connect_timeout=5"}
	for _, action := range []string{"enable", "status"} {
		code, _, errOut := runCLI(t, bad, "notify", action)
		if code != exitFailed || !strings.Contains(errOut, "connect:") || strings.Contains(errOut, "hunter2") {
			t.Errorf("notify %s with an unreachable database: exit %d, stderr %q", action, code, errOut)
		}
	}

	missing := []string{"OUTBOX_RELAY_POSTGRES_DSN=" + o.DSN, "OUTBOX_RELAY_POSTGRES_SCHEMA=" + testenv.Name("none")}
	if code, _, errOut := runCLI(t, missing, "notify", "enable"); code != exitFailed || !strings.Contains(errOut, "migrate up") {
		t.Errorf("notify enable on a missing table: exit %d, stderr %q", code, errOut)
	}
}
