package rabbitmq

import (
	"bytes"
	"errors"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// socket records the writes that reach it; err, if set, fails them.
type socket struct {
	net.Conn // nil: only the methods below are called
	writes   [][]byte
	err      error
	closed   bool
}

func (s *socket) Write(b []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	s.writes = append(s.writes, bytes.Clone(b))
	return len(b), nil
}

func (s *socket) SetWriteDeadline(time.Time) error { return nil }

func (s *socket) Close() error {
	s.closed = true
	return nil
}

func (s *socket) sent() []byte { return bytes.Join(s.writes, nil) }

func mustWrite(t *testing.T, w *wire, b []byte) {
	t.Helper()
	if n, err := w.Write(b); n != len(b) || err != nil {
		t.Fatalf("Write(%d bytes) = %d, %v", len(b), n, err)
	}
}

// TestWireGathersWhileHeld: while held, writes reach the socket only on
// release, as one write with every byte in order; otherwise each write
// goes through as it comes.
func TestWireGathersWhileHeld(t *testing.T) {
	s := &socket{}
	w := &wire{Conn: s, timeout: time.Second}
	mustWrite(t, w, []byte("a"))
	w.hold()
	for _, b := range []string{"bc", "def", "g"} {
		mustWrite(t, w, []byte(b))
	}
	if len(s.writes) != 1 {
		t.Fatalf("socket got %d writes before release, want only the one before hold", len(s.writes))
	}
	if err := w.release(); err != nil {
		t.Fatal(err)
	}
	if len(s.writes) != 2 || string(s.sent()) != "abcdefg" {
		t.Fatalf("socket got %q, want [a bcdefg]", s.writes)
	}
	mustWrite(t, w, []byte("h"))
	if err := w.release(); err != nil {
		t.Fatal(err)
	}
	if len(s.writes) != 3 || string(s.writes[2]) != "h" {
		t.Fatalf("after release a write went %q, want through on its own", s.writes)
	}
}

// TestWireBoundsWhatItGathers: a held wire writes what it gathered before
// it would exceed gatherLimit, and a write of gatherLimit bytes or more (a
// large message's body) goes out as it is, after what came before it.
func TestWireBoundsWhatItGathers(t *testing.T) {
	s := &socket{}
	w := &wire{Conn: s, timeout: time.Second}
	w.hold()
	small := bytes.Repeat([]byte("s"), gatherLimit/3+1)
	mustWrite(t, w, small)
	mustWrite(t, w, small)
	mustWrite(t, w, small) // would pass gatherLimit: the first two go first
	if len(s.writes) != 1 || len(s.writes[0]) != 2*len(small) {
		t.Fatalf("socket got writes of %v bytes, want one of %d", lens(s.writes), 2*len(small))
	}
	big := bytes.Repeat([]byte("B"), gatherLimit)
	mustWrite(t, w, big)
	if got := lens(s.writes); len(got) != 3 || got[1] != len(small) || got[2] != len(big) {
		t.Fatalf("socket got writes of %v bytes, want [%d %d %d]", got, 2*len(small), len(small), len(big))
	}
	if err := w.release(); err != nil || len(s.writes) != 3 {
		t.Fatalf("release: %v with %d writes, want nothing left to write", err, len(s.writes))
	}
	want := append(bytes.Repeat([]byte("s"), 3*len(small)), big...)
	if !bytes.Equal(s.sent(), want) {
		t.Fatal("the socket got the bytes out of order")
	}
}

// TestWireFailedRelease: a gathered write that fails closes the socket and
// fails every later write, so amqp091-go ends the connection and the
// messages awaiting confirms fail with it.
func TestWireFailedRelease(t *testing.T) {
	s := &socket{}
	w := &wire{Conn: s, timeout: time.Second}
	w.hold()
	mustWrite(t, w, []byte("msg"))
	s.err = os.ErrDeadlineExceeded
	if err := w.release(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("release = %v, want the write's error", err)
	}
	if !s.closed {
		t.Fatal("the socket is still open after a failed write")
	}
	s.err = nil
	if _, err := w.Write([]byte("later")); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a later write = %v, want the first failure", err)
	}
	if len(s.writes) != 0 {
		t.Fatalf("socket got %q after the failure", s.writes)
	}
}

// TestWireBrokerClosedCountsAsWritten: a write the broker cut short by
// closing the socket counts as written, so that the close is reported with
// the broker's reason, which the reader finds, rather than a write error.
func TestWireBrokerClosedCountsAsWritten(t *testing.T) {
	for _, errno := range []syscall.Errno{syscall.EPIPE, syscall.ECONNRESET} {
		s := &socket{err: &net.OpError{Op: "write", Err: os.NewSyscallError("write", errno)}}
		w := &wire{Conn: s, timeout: time.Second}
		if n, err := w.Write([]byte("frame")); n != 5 || err != nil {
			t.Errorf("%v: Write = %d, %v, want 5, nil", errno, n, err)
		}
		w.hold()
		mustWrite(t, w, []byte("frame"))
		if err := w.release(); err != nil || s.closed {
			t.Errorf("%v: release = %v (socket closed: %v), want nil and the socket left to the reader", errno, err, s.closed)
		}
	}
}

func lens(bs [][]byte) []int {
	n := make([]int, len(bs))
	for i, b := range bs {
		n[i] = len(b)
	}
	return n
}
