package templates

import (
	"context"
	"io"
	"log/slog"
	"regexp"
	"strings"
)

// LevelTrace is the level of consul-template's TRACE lines (one or more per query): below Debug,
// so that they show only when asked for.
const LevelTrace = slog.LevelDebug - 4

// A line of the standard library's log package as consul-template writes it: an optional date and
// time (the log package's default flags), then "[LEVEL] message".
var (
	logTimeRe  = regexp.MustCompile(`^(?:\d{4}/\d\d/\d\d )?(?:\d\d:\d\d:\d\d(?:\.\d+)? )?`)
	logLevelRe = regexp.MustCompile(`^\[(TRACE|DEBUG|INFO|WARN|WARNING|ERR|ERROR)\] ?(.*)$`)
)

// LogWriter returns a writer for the standard library's log package that passes the lines
// consul-template writes there ("[TRACE] kv.get(x): GET ...", "[WARN] ...") to logger at their
// level: TRACE as LevelTrace, DEBUG as Debug, INFO as Info, WARN as Warn, ERR as Error; a line
// without a level is logged as Info. The library writes to the standard logger only, so the
// binary installs this once, at start:
//
//	log.SetFlags(0)
//	log.SetOutput(templates.LogWriter(logger))
func LogWriter(logger *slog.Logger) io.Writer {
	return &logWriter{logger: logger}
}

type logWriter struct {
	logger *slog.Logger
}

func (w *logWriter) Write(p []byte) (int, error) {
	for line := range strings.Lines(string(p)) {
		line = strings.TrimRight(line, "\r\n")
		if strings.TrimSpace(line) == "" {
			continue
		}
		line = logTimeRe.ReplaceAllString(line, "")
		level, msg := slog.LevelInfo, line
		if m := logLevelRe.FindStringSubmatch(line); m != nil {
			msg = m[2]
			switch m[1] {
			case "TRACE":
				level = LevelTrace
			case "DEBUG":
				level = slog.LevelDebug
			case "WARN", "WARNING":
				level = slog.LevelWarn
			case "ERR", "ERROR":
				level = slog.LevelError
			}
		}
		w.logger.Log(context.Background(), level, msg)
	}
	return len(p), nil
}
