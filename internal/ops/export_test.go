package ops

// ReplayPageSQL is the statement a replay reads its pages with, for the
// test that checks its plan.
func (r *Replayer) ReplayPageSQL() string { return r.page }
