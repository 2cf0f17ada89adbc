package main

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// cpuSnap is a point-in-time reading of the CPU counters a measurement
// compares: the whole machine, this process (the relay engine and the
// consumer, or the ceiling's publisher and the consumer) and the broker.
type cpuSnap struct {
	at                 time.Time
	busyTicks, allTick uint64 // /proc/stat, all CPUs
	self, broker       time.Duration
}

func (b *bench) cpuSnapshot() cpuSnap {
	s := cpuSnap{at: time.Now()}
	s.busyTicks, s.allTick = machineTicks()
	s.self, _ = cpuTime(os.Getpid())
	if b.brokerPID > 0 {
		s.broker, _ = cpuTime(b.brokerPID)
	}
	return s
}

// cpuLine prints what a measurement cost in CPU, in cores (1.00 = one core
// busy for the whole window): this process, the relay's PostgreSQL
// backends (if given, ≥ 0), the broker, and the whole machine.
func (b *bench) cpuLine(name string, s0, s1 cpuSnap, backends time.Duration) {
	el := s1.at.Sub(s0.at).Seconds()
	if el <= 0 {
		return
	}
	cores := func(d time.Duration) string { return fmt.Sprintf("%.2f", d.Seconds()/el) }
	parts := []string{"bench process " + cores(s1.self-s0.self)}
	if backends >= 0 {
		parts = append(parts, "relay's postgres backends "+cores(backends))
	}
	if b.brokerPID > 0 {
		parts = append(parts, "rabbitmq "+cores(s1.broker-s0.broker))
	}
	busy := "n/a"
	if all := s1.allTick - s0.allTick; all > 0 {
		busy = fmt.Sprintf("%.2f", float64(s1.busyTicks-s0.busyTicks)/float64(all)*float64(numCPU()))
	}
	b.out.line(name, busy, "cores busy", "machine-wide, other work included; of which "+strings.Join(parts, ", "))
}

func numCPU() int {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 1
	}
	n := 0
	for _, l := range strings.Split(string(b), "\n") {
		if len(l) > 3 && strings.HasPrefix(l, "cpu") && l[3] >= '0' && l[3] <= '9' {
			n++
		}
	}
	return max(n, 1)
}

// machineTicks returns busy and total ticks of all CPUs from /proc/stat.
func machineTicks() (busy, total uint64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0, 0
	}
	// user nice system idle iowait irq softirq steal
	for i, v := range f[1:min(len(f), 9)] {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, 0
		}
		total += n
		if i != 3 && i != 4 { // idle, iowait
			busy += n
		}
	}
	return busy, total
}

// findBrokerPID returns the local process listening on the AMQP URL's
// port, or 0 if the broker is not on this host or cannot be seen.
func findBrokerPID(amqpURL string) int {
	u, err := url.Parse(amqpURL)
	if err != nil {
		return 0
	}
	host, port := u.Hostname(), u.Port()
	if port == "" {
		port = "5672"
		if u.Scheme == "amqps" {
			port = "5671"
		}
	}
	if ips, err := net.LookupIP(host); err != nil || len(ips) == 0 || !ips[0].IsLoopback() {
		return 0
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		return 0
	}
	inodes := listeningInodes(p)
	if len(inodes) == 0 {
		return 0
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/fd/*")
	for _, fd := range procs {
		target, err := os.Readlink(fd)
		if err != nil || !strings.HasPrefix(target, "socket:[") {
			continue
		}
		if inodes[strings.TrimSuffix(strings.TrimPrefix(target, "socket:["), "]")] {
			pid, err := strconv.Atoi(strings.Split(fd, "/")[2])
			if err == nil {
				return pid
			}
		}
	}
	return 0
}

// listeningInodes returns the socket inodes listening on TCP port p.
func listeningInodes(p int) map[string]bool {
	out := map[string]bool{}
	hexPort := fmt.Sprintf(":%04X", p)
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(b), "\n")[1:] {
			fs := strings.Fields(l)
			// sl local_address rem_address st ... inode is field 9
			if len(fs) > 9 && strings.HasSuffix(fs[1], hexPort) && fs[3] == "0A" {
				out[fs[9]] = true
			}
		}
	}
	return out
}
