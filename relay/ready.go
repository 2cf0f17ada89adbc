package relay

// NotReady is one reason Ready reports: Reason names what is down and is
// safe to show anyone who can reach /readyz; Err has the detail (hosts,
// users, databases), which belongs in the log.
type NotReady struct {
	Reason string // e.g. "postgres link down"
	Err    error
}

// Error is the detail, as logged.
func (e *NotReady) Error() string { return e.Err.Error() }

// Unwrap returns Err.
func (e *NotReady) Unwrap() error { return e.Err }

// Public is what /readyz shows (see metrics.NewServer).
func (e *NotReady) Public() string { return e.Reason }
