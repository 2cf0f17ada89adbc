package rabbitmq

import (
	"errors"
	"net"
	"sync"
	"syscall"
	"time"
)

// gatherLimit is the most bytes a held wire gathers before it writes them;
// a write of at least gatherLimit bytes (a large message's body frame) goes
// out as it is, after what was gathered.
const gatherLimit = 64 << 10

// wire is the socket to the broker as amqp091-go writes to it.
//
// Its writes fail once amqp.confirm_timeout passes: a broker blocked by a
// memory or disk alarm stops reading, and once the socket buffers are full
// an unbounded write would hold the publisher's lock for as long as the
// alarm lasts, hanging settling and shutdown. A failed write closes the
// connection, so the batch fails with reason connection and is retried.
//
// While Send holds it, writes gather in one buffer. amqp091-go flushes each
// message on its own: a system call and a round of TCP processing per
// message, which cost the relay more CPU than building the message does
// (docs/benchmarks.md, "Gathered writes"). Send releases the wire before it
// waits for confirms and when it returns, so nothing waits in the buffer
// while the publisher does.
type wire struct {
	net.Conn
	timeout time.Duration

	mu   sync.Mutex
	held bool
	buf  []byte
	err  error // the write that failed: the socket is closed, and stays failed
	// writes counts the writes that reached the socket.
	writes int
}

// Write writes b, or gathers it while the wire is held.
func (w *wire) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err != nil {
		return 0, w.err
	}
	if w.held && len(b) < gatherLimit {
		if len(w.buf)+len(b) > gatherLimit {
			if err := w.flushLocked(); err != nil {
				return 0, err
			}
		}
		w.buf = append(w.buf, b...)
		return len(b), nil
	}
	if err := w.flushLocked(); err != nil {
		return 0, err
	}
	return w.write(b)
}

// hold makes writes gather until release.
func (w *wire) hold() {
	w.mu.Lock()
	w.held = true
	w.mu.Unlock()
}

// release writes what was gathered and ends the hold. A failed write
// closes the socket, so amqp091-go's reader ends the connection and the
// messages awaiting confirms fail with reason connection, as they would
// had amqp091-go's own write failed.
func (w *wire) release() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.held = false
	return w.flushLocked()
}

func (w *wire) flushLocked() error {
	if len(w.buf) == 0 {
		return nil
	}
	_, err := w.write(w.buf)
	w.buf = w.buf[:0]
	if err != nil {
		w.err = err
		_ = w.Conn.Close()
	}
	return err
}

// write writes b to the socket, failing once timeout passes. A write the
// broker cut short by closing the socket counts as written: the broker
// closed it over a frame being written (one over frame_max, say), and its
// reason waits in the read buffer. Reported here, the failure would make
// amqp091-go close the link with a write error of its own first, the
// broker's reason would be lost, and the message never blamed. The reader
// reports the close, and the unconfirmed messages fail with it.
func (w *wire) write(b []byte) (int, error) {
	if err := w.Conn.SetWriteDeadline(time.Now().Add(w.timeout)); err != nil {
		return 0, err
	}
	w.writes++
	n, err := w.Conn.Write(b)
	if errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) {
		return len(b), nil
	}
	return n, err
}
