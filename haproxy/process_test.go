package haproxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

// startBackend starts an HTTP server on 127.0.0.1 that answers body and returns its port.
func startBackend(t *testing.T, body string) int {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, body)
	}))
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().(*net.TCPAddr).Port
}

// procConfig renders a minimal HAProxy config: one frontend on 127.0.0.1:front (plus extraBind when
// non-zero) that forwards to 127.0.0.1:back.
func procConfig(front, back, extraBind int) []byte {
	extra := ""
	if extraBind != 0 {
		extra = fmt.Sprintf("    bind 127.0.0.1:%d\n", extraBind)
	}
	return fmt.Appendf(nil, `global
    maxconn 1000

defaults
    mode http
    option idle-close-on-response
    timeout connect 2s
    timeout client 10s
    timeout server 10s

frontend fe
    bind 127.0.0.1:%d
%s    default_backend be

backend be
    server s1 127.0.0.1:%d
`, front, extra, back)
}

func testLogger() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// startProcess starts HAProxy on cfg and stops it when the test ends.
func startProcess(t *testing.T, cfg []byte) *Process {
	t.Helper()
	p := NewProcess(Options{
		Binary:        testenv.HAProxyBin(t),
		Dir:           t.TempDir(),
		Logger:        testLogger(),
		ReloadTimeout: 10 * time.Second,
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	startForTest(ctx, t, p, cfg)
	return p
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// getBody returns the body of one request on a fresh connection.
func getBody(port int) (string, error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	return get(c, port, "/")
}

func mustGet(t *testing.T, port int, want string) {
	t.Helper()
	got, err := getBody(port)
	if err != nil {
		t.Fatalf("GET through haproxy: %v", err)
	}
	if got != want {
		t.Fatalf("GET through haproxy = %q, want %q", got, want)
	}
}

func showProc(t *testing.T, p *Process) ProcInfo {
	t.Helper()
	info, err := p.ShowProc(ctxFor(t, 5*time.Second))
	if err != nil {
		t.Fatalf("ShowProc: %v", err)
	}
	return info
}

func onDisk(t *testing.T, p *Process) []byte {
	t.Helper()
	b, err := os.ReadFile(p.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestApplySwitchesBackend(t *testing.T) {
	a, b, front := startBackend(t, "a"), startBackend(t, "b"), testenv.FreePort(t)
	p := startProcess(t, procConfig(front, a, 0))
	if !p.Running() {
		t.Fatal("Running() = false after Start")
	}
	mustGet(t, front, "a")

	cfgB := procConfig(front, b, 0)
	if err := p.Apply(ctxFor(t, 15*time.Second), cfgB); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	mustGet(t, front, "b") // the first request after Apply already reaches the new config
	if !bytes.Equal(p.Config(), cfgB) || !bytes.Equal(onDisk(t, p), cfgB) {
		t.Fatal("Config() or haproxy.cfg is not the applied config")
	}

	// The same config again is not a reload.
	before := showProc(t, p).Reloads
	if err := p.Apply(ctxFor(t, 5*time.Second), cfgB); err != nil {
		t.Fatalf("Apply same config: %v", err)
	}
	if got := showProc(t, p).Reloads; got != before {
		t.Fatalf("reloads = %d after applying the served config, want %d", got, before)
	}
}

func TestApplyUnderLoadLosesNoRequest(t *testing.T) {
	a, b, front := startBackend(t, "a"), startBackend(t, "b"), testenv.FreePort(t)
	cfgs := [][]byte{procConfig(front, a, 0), procConfig(front, b, 0)}
	p := startProcess(t, cfgs[0])
	reloadsBefore := showProc(t, p).Reloads

	const (
		clients     = 8
		maxRequests = 100_000
		applies     = 30
	)
	stop := make(chan struct{})
	deadline := time.Now().Add(12 * time.Second)
	var requests, failures atomic.Int64
	var firstErrs sync.Map
	var wg sync.WaitGroup
	url := fmt.Sprintf("http://127.0.0.1:%d/", front)
	for i := range clients {
		wg.Go(func() {
			c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
			defer c.CloseIdleConnections()
			for time.Now().Before(deadline) && requests.Add(1) <= maxRequests {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := c.Get(url)
				if err == nil {
					body, rerr := io.ReadAll(resp.Body)
					resp.Body.Close()
					switch {
					case rerr != nil:
						err = rerr
					case resp.StatusCode != http.StatusOK:
						err = fmt.Errorf("status %d", resp.StatusCode)
					case string(body) != "a" && string(body) != "b":
						err = fmt.Errorf("body %q", body)
					}
				}
				if err != nil {
					failures.Add(1)
					firstErrs.LoadOrStore(i, err)
				}
			}
		})
	}

	loadDone := make(chan struct{})
	go func() { wg.Wait(); close(loadDone) }()

	// All applies run; the ones that return while the load still runs are the ones that count.
	// A slow or busy machine gets fewer of them within the load's 12 s, not a failure.
	underLoad := 0
	for i := range applies {
		if err := p.Apply(ctxFor(t, 10*time.Second), cfgs[(i+1)%2]); err != nil {
			close(stop)
			<-loadDone
			t.Fatalf("apply %d: %v", i, err)
		}
		select {
		case <-loadDone:
		default:
			underLoad++
		}
	}
	close(stop)
	<-loadDone

	done := min(requests.Load(), maxRequests)
	t.Logf("%d requests, %d of %d applies under load, %d failed requests", done, underLoad, applies, failures.Load())
	if n := failures.Load(); n > 0 {
		firstErrs.Range(func(k, v any) bool { t.Errorf("client %v: %v", k, v); return true })
		t.Fatalf("%d of %d requests failed", n, done)
	}
	if underLoad < 10 {
		t.Fatalf("only %d applies overlapped the load: the machine is too slow for this test to mean much", underLoad)
	}
	if got := showProc(t, p).Reloads - reloadsBefore; got != applies {
		t.Fatalf("reload counter grew by %d, want %d", got, applies)
	}
}

func TestApplyInvalidConfigChangesNothing(t *testing.T) {
	a, front := startBackend(t, "a"), testenv.FreePort(t)
	good := procConfig(front, a, 0)
	p := startProcess(t, good)
	before := showProc(t, p)

	bad := bytes.Replace(good, []byte("global\n"), []byte("global\n    bogus_keyword\n"), 1)
	err := p.Apply(ctxFor(t, 10*time.Second), bad)
	var cfgErr *ConfigError
	if !errors.As(err, &cfgErr) {
		t.Fatalf("Apply(invalid) = %v, want a *ConfigError", err)
	}
	if !strings.Contains(cfgErr.Output, "bogus_keyword") || !strings.Contains(cfgErr.Output, "[config:2]") {
		t.Fatalf("ConfigError.Output = %q, want the ALERT about bogus_keyword on config line 2", cfgErr.Output)
	}
	if !bytes.Equal(onDisk(t, p), good) || !bytes.Equal(p.Config(), good) {
		t.Fatal("an invalid config changed haproxy.cfg or Config()")
	}
	mustGet(t, front, "a")
	if after := showProc(t, p); after.Reloads != before.Reloads {
		t.Fatalf("reloads = %d after an invalid config, want %d", after.Reloads, before.Reloads)
	}
	// Validate alone says the same without a running HAProxy being involved.
	if err := p.Validate(ctxFor(t, 10*time.Second), bad); !errors.As(err, &cfgErr) {
		t.Fatalf("Validate(invalid) = %v, want a *ConfigError", err)
	}
	if err := p.Validate(ctxFor(t, 10*time.Second), good); err != nil {
		t.Fatalf("Validate(valid) = %v", err)
	}
	if leftovers, _ := filepath.Glob(filepath.Join(p.dir, ".haproxy-*")); len(leftovers) > 0 {
		t.Fatalf("temp files left behind: %v", leftovers)
	}
}

func TestApplyFailedReloadKeepsOldConfig(t *testing.T) {
	a, b, front := startBackend(t, "a"), startBackend(t, "b"), testenv.FreePort(t)
	good := procConfig(front, a, 0)
	p := startProcess(t, good)

	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	clash := procConfig(front, b, taken.Addr().(*net.TCPAddr).Port)
	if err := p.Validate(ctxFor(t, 10*time.Second), clash); err != nil {
		t.Fatalf("the port clash should pass haproxy -c: %v", err)
	}

	err = p.Apply(ctxFor(t, 15*time.Second), clash)
	if !errors.Is(err, ErrReloadFailed) {
		t.Fatalf("Apply(port clash) = %v, want ErrReloadFailed", err)
	}
	if !strings.Contains(err.Error(), "Address already in use") {
		t.Errorf("error %q does not carry HAProxy's alert", err)
	}
	mustGet(t, front, "a")
	if !bytes.Equal(onDisk(t, p), good) || !bytes.Equal(p.Config(), good) {
		t.Fatal("after a failed reload haproxy.cfg or Config() is not the previous config")
	}
	if !p.Running() {
		t.Fatal("Running() = false after a failed reload")
	}

	// A valid config after the failed reload goes through.
	if err := p.Apply(ctxFor(t, 15*time.Second), procConfig(front, b, 0)); err != nil {
		t.Fatalf("Apply after a failed reload: %v", err)
	}
	mustGet(t, front, "b")
}

func TestSupervisorRestartsKilledWorker(t *testing.T) {
	a, b, front := startBackend(t, "a"), startBackend(t, "b"), testenv.FreePort(t)
	p := startProcess(t, procConfig(front, a, 0))
	before := showProc(t, p)
	if len(before.Workers) != 1 {
		t.Fatalf("workers = %v, want one", before.Workers)
	}
	if err := syscall.Kill(before.Workers[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}

	// The master exits with its worker; Apply issued while the supervisor restarts it waits.
	deadline := time.Now().Add(15 * time.Second)
	for p.Running() {
		if time.Now().After(deadline) {
			t.Fatal("HAProxy still reported running 15s after its worker was killed")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := p.Apply(ctxFor(t, 15*time.Second), procConfig(front, b, 0)); err != nil {
		t.Fatalf("Apply during restart: %v", err)
	}
	mustGet(t, front, "b")
	if p.Restarts() < 1 {
		t.Fatalf("Restarts() = %d, want >= 1", p.Restarts())
	}
	if after := showProc(t, p); after.MasterPID == before.MasterPID {
		t.Fatalf("master pid %d unchanged after restart", after.MasterPID)
	}
}

func TestStop(t *testing.T) {
	a, front := startBackend(t, "a"), testenv.FreePort(t)
	p := startProcess(t, procConfig(front, a, 0))
	info := showProc(t, p)

	if err := p.Stop(ctxFor(t, 10*time.Second)); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	for _, pid := range append([]int{info.MasterPID}, info.Workers...) {
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("pid %d still exists after Stop (kill 0: %v)", pid, err)
		}
	}
	if conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", front), time.Second); err == nil {
		conn.Close()
		t.Fatal("the frontend port still accepts connections after Stop")
	}
	if procs := haproxyProcs(t, p.dir); len(procs) > 0 {
		t.Fatalf("HAProxy processes left after Stop: %v", procs)
	}
	if p.Running() {
		t.Fatal("Running() = true after Stop")
	}
	if err := p.Apply(ctxFor(t, 5*time.Second), procConfig(front, a, 1)); err == nil {
		t.Fatal("Apply after Stop succeeded")
	}
}

func TestStopDuringRestart(t *testing.T) {
	a, front := startBackend(t, "a"), testenv.FreePort(t)
	p := startProcess(t, procConfig(front, a, 0))
	info := showProc(t, p)
	if err := syscall.Kill(info.Workers[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// Stop lands somewhere in exit, backoff or relaunch: whichever, nothing may survive it.
	time.Sleep(150 * time.Millisecond)
	if err := p.Stop(ctxFor(t, 10*time.Second)); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if procs := haproxyProcs(t, p.dir); len(procs) > 0 {
		t.Fatalf("HAProxy processes left after Stop: %v", procs)
	}
	if p.Running() {
		t.Fatal("Running() = true after Stop")
	}
}

// haproxyProcs lists the live processes whose command line mentions dir (zombies have none).
func haproxyProcs(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	var found []string
	for _, e := range entries {
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cmdline, []byte(dir)) {
			continue
		}
		found = append(found, e.Name()+": "+string(bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '})))
	}
	return found
}

func TestStartFailsWhenPortTaken(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	p := NewProcess(Options{Binary: testenv.HAProxyBin(t), Dir: t.TempDir(), Logger: testLogger()})
	err = p.Start(ctxFor(t, 10*time.Second), procConfig(taken.Addr().(*net.TCPAddr).Port, 1, 0))
	if err == nil {
		_ = p.Stop(ctxFor(t, 10*time.Second))
		t.Fatal("Start on a port in use succeeded")
	}
	if !strings.Contains(err.Error(), "Address already in use") {
		t.Errorf("Start error %q does not carry HAProxy's alert", err)
	}
	if procs := haproxyProcs(t, p.dir); len(procs) > 0 {
		t.Fatalf("HAProxy processes left after a failed Start: %v", procs)
	}
	if p.Running() {
		t.Fatal("Running() = true after a failed Start")
	}

	var cfgErr *ConfigError
	if err := p.Start(ctxFor(t, 10*time.Second), []byte("global\n    bogus_keyword\n")); !errors.As(err, &cfgErr) {
		t.Fatalf("Start(invalid) = %v, want a *ConfigError", err)
	}
	if _, err := os.Stat(p.cfgPath); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a config HAProxy refused at start is left as %s (stat: %v)", p.cfgPath, err)
	}
	if p.Running() {
		t.Fatal("Running() = true after a Start on a config HAProxy refused")
	}
}

func TestParseShowProc(t *testing.T) {
	tests := []struct {
		name, in string
		want     ProcInfo
	}{{
		name: "after a reload, with an old worker still finishing",
		in: "#<PID>          <type>          <reloads>       <uptime>        <version>      \n" +
			"7421            master          7 [failed: 0]   0d00h00m30s     2.6.12-1+deb12u4\n" +
			"# workers\n" +
			"10044           worker          0               0d00h00m00s     2.6.12-1+deb12u4\n" +
			"# old workers\n" +
			"9536            worker          1               0d00h00m03s     2.6.12-1+deb12u4\n" +
			"# programs\n\n",
		want: ProcInfo{MasterPID: 7421, Reloads: 7, Workers: []int{10044}, OldWorkers: []int{9536}},
	}, {
		name: "after failed reloads the worker stays current",
		in: "#<PID>          <type>          <reloads>       <uptime>        <version>      \n" +
			"11856           master          5 [failed: 2]   0d00h00m18s     2.6.12-1+deb12u4\n" +
			"# workers\n" +
			"12132           worker          2               0d00h00m18s     2.6.12-1+deb12u4\n" +
			"# programs\n\n",
		want: ProcInfo{MasterPID: 11856, Reloads: 5, FailedReloads: 2, Workers: []int{12132}},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseShowProc(tt.in)
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
	for _, bad := range []string{"", "Unknown command.\n", "#<PID> <type>\n1 master x [failed: 0] 0d 2.6\n"} {
		if _, err := ParseShowProc(bad); err == nil {
			t.Errorf("ParseShowProc(%q) succeeded", bad)
		}
	}
}

// A config vouched for is reloaded without a check of its own; if HAProxy refuses it all the same,
// the reload fails and the config served keeps serving.
func TestVouchedForThenARefusedWholeKeepsTheOldConfig(t *testing.T) {
	a, b, front := startBackend(t, "a"), startBackend(t, "b"), testenv.FreePort(t)
	good := procConfig(front, a, 0)
	p := startProcess(t, good)
	before := showProc(t, p)

	bad := bytes.Replace(procConfig(front, b, 0), []byte("global\n"), []byte("global\n    bogus_keyword\n"), 1)
	if err := p.Validate(ctxFor(t, 10*time.Second), good); err != nil {
		t.Fatalf("Validate(good part) = %v", err)
	}
	p.Vouch(bad)
	err := p.Apply(ctxFor(t, 15*time.Second), bad)
	if !errors.Is(err, ErrReloadFailed) {
		t.Fatalf("Apply(refused whole) = %v, want ErrReloadFailed", err)
	}
	mustGet(t, front, "a")
	if !bytes.Equal(onDisk(t, p), good) || !bytes.Equal(p.Config(), good) {
		t.Fatal("after the refused reload haproxy.cfg or Config() is not the previous config")
	}
	// A part HAProxy refuses is a *ConfigError; the vouching served once: a good config is checked
	// and served.
	var cfgErr *ConfigError
	if err := p.Validate(ctxFor(t, 10*time.Second), bad); !errors.As(err, &cfgErr) {
		t.Fatalf("Validate(bad part) = %v, want a *ConfigError", err)
	}
	if err := p.Apply(ctxFor(t, 15*time.Second), procConfig(front, b, 0)); err != nil {
		t.Fatalf("Apply of a good config after the failures: %v", err)
	}
	mustGet(t, front, "b")
	if after := showProc(t, p); after.Reloads <= before.Reloads {
		t.Fatalf("reloads = %d, want more than %d", after.Reloads, before.Reloads)
	}
}

// HAProxy's master and worker run with the malloc settings, after a reload too; an operator's own
// setting wins.
func TestHAProxyRunsWithTheMallocSettings(t *testing.T) {
	environ := func(pid int) []string {
		t.Helper()
		b, err := os.ReadFile(filepath.Join("/proc", fmt.Sprint(pid), "environ"))
		if err != nil {
			t.Fatal(err)
		}
		return strings.Split(string(b), "\x00")
	}
	hasAll := func(env []string) bool {
		for _, kv := range mallocEnv {
			if !slices.Contains(env, kv) {
				return false
			}
		}
		return true
	}
	back := startBackend(t, "one")
	front := testenv.FreePort(t)
	p := startProcess(t, procConfig(front, back, 0))
	if env := environ(showProc(t, p).MasterPID); !hasAll(env) {
		t.Errorf("the master's environment lacks %v: %v", mallocEnv, env)
	}
	if err := p.Reload(ctxFor(t, 10*time.Second), procConfig(front, back, 0)); err != nil {
		t.Fatal(err)
	}
	info := showProc(t, p)
	for _, pid := range []int{info.MasterPID, info.Workers[0]} {
		if env := environ(pid); !hasAll(env) {
			t.Errorf("after a reload, the environment of %d lacks %v: %v", pid, mallocEnv, env)
		}
	}
	mustGet(t, front, "one")

	t.Setenv("MALLOC_TOP_PAD_", "1048576")
	if env := haproxyEnv(); !slices.Contains(env, "MALLOC_TOP_PAD_=1048576") || !slices.Contains(env, mallocEnv[0]) || slices.Contains(env, mallocEnv[1]) {
		t.Errorf("with MALLOC_TOP_PAD_ set, HAProxy's environment has %v", env)
	}
}
