package main

import (
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strings"
	"sync"
	"time"
)

// report prints one figure per line, "name: value unit", with section
// headings as "# name" lines so the output stays easy to grep and diff.
type report struct {
	mu sync.Mutex
	w  io.Writer
}

func newReport(w io.Writer) *report { return &report{w: w} }

func (r *report) section(name string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	fmt.Fprintf(r.w, "# %s\n", name)
}

// line prints name: value unit; note, if any, follows after "  # ".
func (r *report) line(name, value, unit string, note ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := name + ": " + value
	if unit != "" {
		s += " " + unit
	}
	if len(note) > 0 && note[0] != "" {
		s += "  # " + strings.Join(note, "; ")
	}
	fmt.Fprintln(r.w, s)
}

func (r *report) rate(name string, v float64, unit string, note ...string) {
	r.line(name, fmt.Sprintf("%.0f", v), unit, note...)
}

func (r *report) ratio(name string, num, den float64, note ...string) {
	if den == 0 || math.IsNaN(num) || math.IsNaN(den) {
		r.line(name, "n/a", "", note...)
		return
	}
	r.line(name, fmt.Sprintf("%.2f", num/den), "", note...)
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f", float64(d)/float64(time.Millisecond)) }

// percentile returns the p-th percentile (0 < p ≤ 100) of sorted values,
// nearest-rank.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	rank = min(max(rank, 1), len(sorted))
	return sorted[rank-1]
}

func sortDurations(d []time.Duration) { slices.Sort(d) }

// loadavg returns the 1, 5 and 15 minute load averages of the machine.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "n/a"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "n/a"
	}
	return strings.Join(f[:3], " ")
}

// cpuModel returns the first "model name" of /proc/cpuinfo.
func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "n/a"
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "n/a"
}

// memTotal returns MemTotal from /proc/meminfo.
func memTotal() string {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return "n/a"
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "MemTotal:") {
			return strings.TrimSpace(strings.TrimPrefix(l, "MemTotal:"))
		}
	}
	return "n/a"
}
