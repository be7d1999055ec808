package templates_test

import (
	"bytes"
	"log"
	"log/slog"
	"strings"
	"testing"

	"github.com/docker-flow-proxy/docker-flow-proxy/templates"
)

func TestLogWriter(t *testing.T) {
	var buf bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{
		Level: slog.LevelDebug,
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		},
	}))
	// A logger of its own, with the log package's default flags: the date is dropped too.
	std := log.New(templates.LogWriter(logger), "", log.LstdFlags)
	std.Printf("[TRACE] kv.get(x): GET /v1/kv/x")
	std.Printf("[DEBUG] (runner) missing data for 1 dependencies")
	std.Printf("[WARN] (view) health.service(books-ms|passing): connection refused (retry attempt 1)")
	std.Printf("[ERR] (view) exceeded maximum retries")
	std.Printf("no level here")

	want := `level=DEBUG msg="(runner) missing data for 1 dependencies"
level=WARN msg="(view) health.service(books-ms|passing): connection refused (retry attempt 1)"
level=ERROR msg="(view) exceeded maximum retries"
level=INFO msg="no level here"
`
	if got := buf.String(); got != want {
		t.Errorf("logged:\n%s\nwant (TRACE below Debug, dropped):\n%s", got, want)
	}
	if strings.Contains(buf.String(), "kv.get") {
		t.Error("a TRACE line was logged at Debug")
	}
}
