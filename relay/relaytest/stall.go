package relaytest

// stall is the Stall and Resume state that Fake and Proxy share: resumed
// exists while stalled and Resume closes it, releasing whoever waits on it.
// The owner's mutex guards it.
type stall struct {
	resumed chan struct{} // non-nil while stalled; closed by Resume
}

// hold starts a stall; while one lasts it does nothing.
func (s *stall) hold() {
	if s.resumed == nil {
		s.resumed = make(chan struct{})
	}
}

// release ends a stall, if any.
func (s *stall) release() {
	if s.resumed != nil {
		close(s.resumed)
		s.resumed = nil
	}
}
