package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"testing"
)

// programTB lets the test helpers of internal/testenv (which start Consul and find HAProxy) run in
// a program. A Fatal or Skip records the message and ends the calling goroutine, as in a test:
// the harness calls those helpers on a goroutine of their own and reads Failed afterwards.
type programTB struct {
	// TB is nil: it only supplies the interface's unexported method. Every exported method is
	// defined below, so nothing ever calls through it.
	testing.TB

	mu       sync.Mutex
	failed   bool
	msgs     []string
	cleanups []func()
}

var _ testing.TB = (*programTB)(nil)

func (t *programTB) record(msg string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.failed = true
	t.msgs = append(t.msgs, msg)
	fmt.Fprintln(os.Stderr, "dfp-bench:", msg)
}

// runCleanups runs the registered cleanups, last first.
func (t *programTB) runCleanups() {
	t.mu.Lock()
	cs := t.cleanups
	t.cleanups = nil
	t.mu.Unlock()
	for i := len(cs) - 1; i >= 0; i-- {
		cs[i]()
	}
}

func (t *programTB) ArtifactDir() string    { return t.TempDir() }
func (t *programTB) Attr(key, value string) {}
func (t *programTB) Cleanup(f func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.cleanups = append(t.cleanups, f)
}
func (t *programTB) Error(args ...any)                 { t.record(fmt.Sprint(args...)) }
func (t *programTB) Errorf(format string, args ...any) { t.record(fmt.Sprintf(format, args...)) }
func (t *programTB) Fail()                             { t.record("failed") }
func (t *programTB) FailNow()                          { t.record("failed"); runtime.Goexit() }
func (t *programTB) Failed() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.failed
}
func (t *programTB) Fatal(args ...any) { t.record(fmt.Sprint(args...)); runtime.Goexit() }
func (t *programTB) Fatalf(format string, args ...any) {
	t.record(fmt.Sprintf(format, args...))
	runtime.Goexit()
}
func (t *programTB) Helper()                         {}
func (t *programTB) Log(args ...any)                 { fmt.Fprintln(os.Stderr, args...) }
func (t *programTB) Logf(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }
func (t *programTB) Name() string                    { return "dfp-bench" }
func (t *programTB) Setenv(key, value string)        { _ = os.Setenv(key, value) }
func (t *programTB) Chdir(dir string)                { _ = os.Chdir(dir) }

// A skipped helper means a missing program: the benchmark cannot run without it.
func (t *programTB) Skip(args ...any)                 { t.Fatal(args...) }
func (t *programTB) SkipNow()                         { t.FailNow() }
func (t *programTB) Skipf(format string, args ...any) { t.Fatalf(format, args...) }
func (t *programTB) Skipped() bool                    { return false }
func (t *programTB) TempDir() string {
	dir, err := os.MkdirTemp("", "dfp-bench")
	if err != nil {
		t.Fatalf("temp dir: %v", err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}
func (t *programTB) Context() context.Context { return context.Background() }
func (t *programTB) Output() io.Writer        { return os.Stderr }
