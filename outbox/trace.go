package outbox

import (
	"context"
	"regexp"
)

// HeaderTraceparent is the W3C Trace Context header name. The relay forwards
// it like any other header, so a consumer can continue the producer's trace.
const HeaderTraceparent = "traceparent"

type traceparentKey struct{}

// traceparentPattern is version 00 of the W3C traceparent format:
// version-traceid-parentid-flags, lowercase hex (ValidTraceparent also
// rejects all-zero ids).
var traceparentPattern = regexp.MustCompile(`^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$`)

// ContextWithTraceparent returns ctx carrying a W3C traceparent value. Write
// stores it in the "traceparent" header of every event written with that
// context that does not set the header itself. Invalid values are ignored, so
// a malformed upstream header cannot make writes fail.
//
// With OpenTelemetry, format the span context of the current span:
//
//	sc := trace.SpanContextFromContext(ctx)
//	ctx = outbox.ContextWithTraceparent(ctx, fmt.Sprintf("00-%s-%s-%s", sc.TraceID(), sc.SpanID(), sc.TraceFlags()))
func ContextWithTraceparent(ctx context.Context, traceparent string) context.Context {
	if !ValidTraceparent(traceparent) {
		return ctx
	}
	return context.WithValue(ctx, traceparentKey{}, traceparent)
}

// TraceparentFromContext returns the traceparent stored by ContextWithTraceparent.
func TraceparentFromContext(ctx context.Context) (string, bool) {
	tp, ok := ctx.Value(traceparentKey{}).(string)
	return tp, ok
}

// ValidTraceparent reports whether s is a well-formed version-00 traceparent.
func ValidTraceparent(s string) bool {
	return traceparentPattern.MatchString(s) &&
		s[3:35] != "00000000000000000000000000000000" && s[36:52] != "0000000000000000"
}
