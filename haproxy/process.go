// Package haproxy runs HAProxy as a supervised child in master-worker mode and changes its
// configuration without losing a request: every config is validated with `haproxy -c` first, a
// reload counts only once the master CLI shows a new worker, and a reload that HAProxy rejects
// leaves the previous config serving and on disk.
package haproxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	defaultReloadTimeout = 30 * time.Second
	// defaultConsolidateAfter: see Options.ConsolidateAfter.
	defaultConsolidateAfter = 2 * time.Second
	// consolidateMaxDelay bounds, in ConsolidateAfters from the first change that HAProxy serves
	// other than written, how long changes that keep coming put the consolidating reload off.
	consolidateMaxDelay = 5
	minBackoff          = 100 * time.Millisecond
	maxBackoff          = 5 * time.Second
	// stableAfter is how long HAProxy must have run for a crash to count as a new incident
	// (restart delay back to minBackoff) rather than a crash loop.
	stableAfter = 10 * time.Second
	// pollEvery is how often the master CLI is asked for `show proc` while waiting for a worker.
	pollEvery = 10 * time.Millisecond
	// killWait bounds the wait for a process group after SIGKILL.
	killWait = 5 * time.Second
	// maxSocketPath is the longest unix socket path Linux accepts (sun_path is 108 bytes).
	maxSocketPath = 107
)

// ErrReloadFailed means HAProxy did not take the new config although `haproxy -c` accepted it
// (for example a port already in use). The previous config keeps serving and is back on disk.
var ErrReloadFailed = errors.New("reload failed, the previous config keeps serving")

var (
	errNotStarted = errors.New("haproxy is not started")
	errStopped    = errors.New("haproxy is stopped")
	errExited     = errors.New("haproxy exited")
)

// ConfigError is a config that `haproxy -c` rejected.
type ConfigError struct {
	// Output holds HAProxy's ALERT lines, one per line, without the pid prefix; the candidate
	// file is called "config" in them (e.g. "config : parsing [config:2] : unknown keyword ...").
	Output string
}

func (e *ConfigError) Error() string { return "invalid haproxy config: " + e.Output }

// Options configure a Process.
type Options struct {
	Binary string       // haproxy binary path; "" = "haproxy" from PATH
	Dir    string       // config folder: haproxy.cfg, master.sock and temp files (created if missing)
	Logger *slog.Logger // nil = slog.Default()
	// ReloadTimeout bounds the wait for a new worker after a start or reload; 0 = 30s.
	ReloadTimeout time.Duration
	// ConsolidateAfter is how long after the last route added or removed through the runtime API
	// (served by a spare backend, or leaving an unused backend) HAProxy is reloaded to serve the
	// config as written; 0 = 2s. Changes that keep coming put that reload off by at most
	// consolidateMaxDelay times as long.
	ConsolidateAfter time.Duration
}

// Process controls one HAProxy master-worker process tree. It is safe for concurrent use; Start
// and Apply calls are serialized. A Process is started once: after Stop it stays stopped.
type Process struct {
	bin, dir, cfgPath, sockPath string
	log                         *slog.Logger
	reloadTimeout               time.Duration
	consolidateAfter            time.Duration

	// validated is the digest of the last config that passed Validate; the Apply that follows with
	// the same bytes uses it once instead of running `haproxy -c` again (the controller validates
	// before it writes KV, then applies).
	vmu       sync.Mutex
	validated [sha256.Size]byte

	// life is cancelled by Stop; everything that waits also watches it.
	life context.Context
	stop context.CancelFunc

	// applySem serializes Start and Apply. runSem is held by whoever runs or replaces the current
	// HAProxy (a reload, a supervisor restart), so the file on disk never changes under either.
	// Order: applySem before runSem.
	applySem chan struct{}
	runSem   chan struct{}

	supDone chan struct{} // closed when the supervisor goroutine returns

	mu          sync.Mutex
	cur         *instance     // the HAProxy serving now; nil while down
	up          chan struct{} // closed when cur becomes non-nil; replaced when it goes down
	cfg         []byte        // the config cur serves
	uncertain   bool          // a reload ended without a verdict: cfg may not be what is served
	started     bool
	stopped     bool
	reloading   bool
	restarts    int
	maxConn     int          // HAProxy's Maxconn as its current worker reported it (0: not read)
	ov          overlay      // names HAProxy serves under since it loaded cfg (UpdateServers)
	parsed      parsedServed // cfg parsed, when the last UpdateServers served it
	consolidate *time.Timer  // the reload that ends the overlay (consolidateLater)
	reloadHook  func(time.Duration, error)
}

// instance is one run of the HAProxy master.
type instance struct {
	cmd     *exec.Cmd
	pid     int
	started time.Time
	done    chan struct{} // closed once the master has exited and been reaped
	err     error         // cmd.Wait's result; read only after done is closed
	out     output
}

func (in *instance) exited() bool {
	select {
	case <-in.done:
		return true
	default:
		return false
	}
}

// NewProcess returns a controller; nothing runs until Start.
func NewProcess(opts Options) *Process {
	bin := opts.Binary
	if bin == "" {
		bin = "haproxy"
	}
	dir := opts.Dir
	if abs, err := filepath.Abs(dir); err == nil {
		dir = abs
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.Default()
	}
	timeout := opts.ReloadTimeout
	if timeout <= 0 {
		timeout = defaultReloadTimeout
	}
	consolidate := opts.ConsolidateAfter
	if consolidate <= 0 {
		consolidate = defaultConsolidateAfter
	}
	life, stop := context.WithCancel(context.Background())
	return &Process{
		consolidateAfter: consolidate,
		bin:              bin,
		dir:              dir,
		cfgPath:          filepath.Join(dir, "haproxy.cfg"),
		sockPath:         MasterSocket(dir),
		log:              logger,
		reloadTimeout:    timeout,
		life:             life,
		stop:             stop,
		applySem:         make(chan struct{}, 1),
		runSem:           make(chan struct{}, 1),
		supDone:          make(chan struct{}),
		up:               make(chan struct{}),
	}
}

// Validate checks cfg with `haproxy -c` without touching the running HAProxy. It returns a
// *ConfigError when HAProxy rejects the config.
func (p *Process) Validate(ctx context.Context, cfg []byte) error {
	tmp, err := p.writeTemp(cfg)
	if err != nil {
		return fmt.Errorf("haproxy validate: %w", err)
	}
	defer os.Remove(tmp)
	if err := p.validateFile(ctx, tmp); err != nil {
		return err
	}
	p.vmu.Lock()
	p.validated = sha256.Sum256(cfg)
	p.vmu.Unlock()
	return nil
}

// Vouch takes cfg as validated: the next Apply of cfg reloads without checking it again. The caller
// vouches that a config Validate passed stands for cfg (the controller checks the routes a change
// touches, rendered alone). If HAProxy refused cfg all the same, the reload would fail and the
// config served would keep serving.
func (p *Process) Vouch(cfg []byte) {
	sum := sha256.Sum256(cfg)
	p.vmu.Lock()
	p.validated = sum
	p.vmu.Unlock()
}

// justValidated reports whether cfg is the config Validate passed last, and forgets it: files the
// config names (certificates) may change, so a result serves once.
func (p *Process) justValidated(cfg []byte) bool {
	sum := sha256.Sum256(cfg)
	p.vmu.Lock()
	defer p.vmu.Unlock()
	ok := p.validated == sum
	p.validated = [sha256.Size]byte{}
	return ok
}

// Start writes cfg to Dir/haproxy.cfg and starts HAProxy on it, returning once a worker serves
// (bounded by ctx); a config HAProxy refuses is a *ConfigError and is not left on disk. From then
// on HAProxy is supervised: if it exits before Stop it is restarted with the current haproxy.cfg,
// with a backoff of 100ms doubling up to 5s.
func (p *Process) Start(ctx context.Context, cfg []byte) error {
	if err := acquire(ctx, p.applySem); err != nil {
		return fmt.Errorf("haproxy start: %w", err)
	}
	defer release(p.applySem)

	p.mu.Lock()
	started, stopped := p.started, p.stopped
	p.mu.Unlock()
	switch {
	case stopped:
		return fmt.Errorf("haproxy start: %w", errStopped)
	case started:
		return errors.New("haproxy start: already started")
	case len(p.sockPath) > maxSocketPath:
		return fmt.Errorf("haproxy start: socket path %s is longer than %d bytes", p.sockPath, maxSocketPath)
	case strings.Contains(p.sockPath, ","):
		return fmt.Errorf("haproxy start: socket path %s contains a comma", p.sockPath)
	}

	// No HAProxy serves yet, so there is no old config to keep: the master's own parse checks cfg,
	// and a separate `haproxy -c` first would parse it twice (half a second at 10,000 services).
	// A master that exits during its start is asked why with `haproxy -c`: a refused config is a
	// *ConfigError, as a refused reload is, and is not left as haproxy.cfg.
	if err := p.writeFile(p.cfgPath, cfg); err != nil {
		return fmt.Errorf("haproxy start: %w", err)
	}
	lctx, cancel := context.WithTimeout(ctx, p.reloadTimeout)
	defer cancel()
	in, err := p.launch(lctx)
	if err != nil {
		if errors.Is(err, errExited) && ctx.Err() == nil {
			var cfgErr *ConfigError
			if verr := p.validateFile(ctx, p.cfgPath); errors.As(verr, &cfgErr) {
				_ = os.Remove(p.cfgPath)
				return fmt.Errorf("haproxy start: %w", verr)
			}
		}
		return fmt.Errorf("haproxy start: %w", err)
	}
	if !p.markUp(in, cfg, false) {
		p.kill(in)
		if p.life.Err() != nil {
			return fmt.Errorf("haproxy start: %w", errStopped)
		}
		return fmt.Errorf("haproxy start: %w (%v)", errExited, in.err)
	}
	p.log.Info("haproxy started", "pid", in.pid, "config", p.cfgPath)
	if info, err := ShowProcAt(ctx, p.sockPath); err == nil {
		p.readMaxConn(ctx, info.Workers)
	}
	go p.supervise(in)
	return nil
}

// Apply makes HAProxy serve cfg and returns once a new worker serves it. An invalid config
// returns a *ConfigError and changes nothing. A reload that HAProxy rejects returns an error
// wrapping ErrReloadFailed: the previous config keeps serving and is written back to disk.
// While the supervisor restarts HAProxy, Apply waits for it (bounded by ctx). A cfg equal to the
// one served returns nil at once.
func (p *Process) Apply(ctx context.Context, cfg []byte) error { return p.apply(ctx, cfg, false) }

// Reload makes HAProxy load cfg even when it equals the config served: HAProxy reads files the
// config names (certificates) only when it loads it. It validates first, as Apply does.
func (p *Process) Reload(ctx context.Context, cfg []byte) error { return p.apply(ctx, cfg, true) }

func (p *Process) apply(ctx context.Context, cfg []byte, force bool) error {
	if err := acquire(ctx, p.applySem); err != nil {
		return fmt.Errorf("haproxy apply: %w", err)
	}
	defer release(p.applySem)
	return p.applyHeld(ctx, cfg, force, false)
}

// applyHeld is apply with applySem held; checked skips the check of cfg before the reload (the
// config served already, each change that made it checked as it came).
func (p *Process) applyHeld(ctx context.Context, cfg []byte, force, checked bool) error {
	p.mu.Lock()
	same := p.started && !p.uncertain && bytes.Equal(p.cfg, cfg)
	p.mu.Unlock()
	if same && !force {
		return nil
	}

	if !checked && (force || !p.justValidated(cfg)) {
		if err := p.Validate(ctx, cfg); err != nil {
			return fmt.Errorf("haproxy apply: %w", err)
		}
	}

	for {
		in, err := p.waitUp(ctx)
		if err != nil {
			return fmt.Errorf("haproxy apply: waiting for haproxy: %w", err)
		}
		if err := acquire(ctx, p.runSem); err != nil {
			return fmt.Errorf("haproxy apply: %w", err)
		}
		if in.exited() {
			// It died between waitUp and here: wait for the supervisor again.
			release(p.runSem)
			continue
		}
		retry, err := p.reload(ctx, in, cfg)
		release(p.runSem)
		if retry {
			continue
		}
		if err == nil {
			p.pruneMaps(cfg)
		}
		return err
	}
}

// reload writes the validated cfg to haproxy.cfg and reloads in. retry is true when in died before
// it got the signal: nothing changed and the caller should wait for the restart and try again.
func (p *Process) reload(ctx context.Context, in *instance, cfg []byte) (retry bool, err error) {
	bctx, cancel := context.WithTimeout(ctx, p.reloadTimeout)
	before, err := p.pollProc(bctx, in, func(ProcInfo) bool { return true })
	cancel()
	if err != nil {
		if in.exited() {
			return true, nil
		}
		return false, fmt.Errorf("haproxy reload: reading state: %w", err)
	}

	old := p.Config()
	if err := p.writeFile(p.cfgPath, cfg); err != nil {
		return false, fmt.Errorf("haproxy reload: %w", err)
	}
	restore := func() {
		if err := p.writeFile(p.cfgPath, old); err != nil {
			p.log.Error("haproxy: cannot restore the previous config", "path", p.cfgPath, "err", err)
		}
	}

	p.setReloading(true)
	defer p.setReloading(false)
	mark := in.out.mark()
	t0 := time.Now()
	if err := in.cmd.Process.Signal(syscall.SIGUSR2); err != nil {
		restore()
		if in.exited() || errors.Is(err, os.ErrProcessDone) {
			return true, nil
		}
		return false, fmt.Errorf("haproxy reload: signal master: %w", err)
	}

	wctx, cancel := context.WithTimeout(ctx, p.reloadTimeout)
	defer cancel()
	var rejected bool
	after, err := p.pollProc(wctx, in, func(info ProcInfo) bool {
		if info.Reloads <= before.Reloads {
			return false // the master has not re-executed yet
		}
		if info.FailedReloads > before.FailedReloads {
			rejected = true
			return true
		}
		return servesAnew(before.Workers, info.Workers)
	})
	switch {
	case err == nil && !rejected:
		p.mu.Lock()
		p.cfg, p.parsed = bytes.Clone(cfg), parsedServed{}
		p.ov = newOverlay(cfg)
		p.uncertain = false
		p.mu.Unlock()
		p.log.Info("haproxy reloaded", "workers", after.Workers, "old_workers", after.OldWorkers,
			"reloads", after.Reloads, "duration", time.Since(t0).Round(time.Millisecond))
		p.readMaxConn(ctx, after.Workers)
		return false, nil
	case err == nil && rejected:
		restore()
		alerts := withHints(in.out.failureAlerts(mark))
		p.log.Error("haproxy rejected the new config; the previous one keeps serving",
			"alerts", alerts, "failed_reloads", after.FailedReloads)
		return false, fmt.Errorf("haproxy reload: %w: %s", ErrReloadFailed, strings.Join(alerts, "; "))
	case errors.Is(err, errExited):
		// The master died during the reload: the supervisor restarts it with the previous config.
		restore()
		return false, fmt.Errorf("haproxy reload: %w: haproxy exited (%v)", ErrReloadFailed, in.err)
	case errors.Is(err, errStopped):
		restore()
		return false, fmt.Errorf("haproxy reload: %w", err)
	default:
		// No verdict (timeout): put the previous file back so a restart uses it, and never
		// skip the next Apply as "already served".
		restore()
		p.mu.Lock()
		p.uncertain = true
		p.mu.Unlock()
		return false, fmt.Errorf("haproxy reload: no new worker after %s: %w",
			time.Since(t0).Round(time.Millisecond), err)
	}
}

// servesAnew reports whether a worker that was not there before is listed and none of the previous
// workers is still a current one (they are old workers or gone).
func servesAnew(before, now []int) bool {
	fresh := false
	for _, pid := range now {
		if slices.Contains(before, pid) {
			return false
		}
		fresh = true
	}
	return fresh
}

// Config returns a copy of the config currently served (nil before Start).
func (p *Process) Config() []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	return bytes.Clone(p.cfg)
}

// Stop ends supervision and stops HAProxy: SIGTERM to the master (workers hard-stop), then, if
// it has not exited when ctx ends, SIGKILL to the whole process group.
func (p *Process) Stop(ctx context.Context) error {
	p.mu.Lock()
	if p.stopped {
		p.mu.Unlock()
		return nil
	}
	p.stopped = true
	p.stop()
	if p.consolidate != nil {
		p.consolidate.Stop()
	}
	in, started := p.cur, p.started
	p.cur = nil
	p.mu.Unlock()

	if in != nil {
		_ = in.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-in.done:
		case <-ctx.Done():
			p.log.Warn("haproxy did not stop in time; killing it", "pid", in.pid)
		}
		p.kill(in) // also takes down workers that outlived the master
		if !in.exited() {
			return fmt.Errorf("haproxy stop: pid %d still running after SIGKILL", in.pid)
		}
		p.log.Info("haproxy stopped", "pid", in.pid)
	}
	if started {
		// The supervisor watches life, already cancelled; a restart it had under way is killed.
		select {
		case <-p.supDone:
		case <-time.After(killWait):
			return errors.New("haproxy stop: supervisor did not end")
		}
	}
	return nil
}

// ShowProc returns the master CLI's `show proc`.
func (p *Process) ShowProc(ctx context.Context) (ProcInfo, error) {
	return ShowProcAt(ctx, p.sockPath)
}

// MasterSocket is the path of the master CLI's socket of a Process whose config folder is dir.
func MasterSocket(dir string) string { return filepath.Join(dir, "master.sock") }

// ShowProcAt asks the master CLI listening at socketPath for `show proc`: the pids of the master,
// its workers and the old workers still finishing their connections.
func ShowProcAt(ctx context.Context, socketPath string) (ProcInfo, error) {
	giveUp := time.Now().Add(dialRetry)
	for {
		out, err := query(ctx, socketPath, "show proc", dialRetry)
		if err == nil {
			info, err := ParseShowProc(out)
			if err != nil {
				return ProcInfo{}, fmt.Errorf("haproxy show proc: %w", err)
			}
			return info, nil
		}
		// The master resets connections it accepted just before re-executing: ask again.
		reset := errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
		if !reset || time.Now().After(giveUp) {
			return ProcInfo{}, fmt.Errorf("haproxy show proc: %w", err)
		}
		if err := sleepCtx(ctx, pollEvery); err != nil {
			return ProcInfo{}, fmt.Errorf("haproxy show proc: %w", err)
		}
	}
}

// Running reports whether the HAProxy master is alive and lists a worker. During a reload, when
// the master CLI is unavailable, a live master counts as running: the old worker serves.
func (p *Process) Running() bool {
	p.mu.Lock()
	in, reloading := p.cur, p.reloading
	p.mu.Unlock()
	if in == nil || in.exited() {
		return false
	}
	if reloading {
		return true
	}
	ctx, cancel := context.WithTimeout(p.life, 2*time.Second)
	defer cancel()
	info, err := p.ShowProc(ctx)
	return err == nil && info.MasterPID == in.pid && len(info.Workers) > 0
}

// LowMaxConn is the connection limit below which HAProxy's start or reload is logged as a warning.
const LowMaxConn = 1000

// MaxConn is how many connections HAProxy accepts at once (Maxconn of `show info`), as read after
// its last start or reload; 0 before. No config of the renderer's sets it: HAProxy derives it from
// the open files limit, less one descriptor per health-checked server.
func (p *Process) MaxConn() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.maxConn
}

// readMaxConn asks the current worker for its connection limit and warns when it is low, once
// per value.
func (p *Process) readMaxConn(ctx context.Context, workers []int) {
	if len(workers) == 0 {
		return
	}
	cctx, cancel := context.WithTimeout(ctx, runtimeCmdTimeout)
	defer cancel()
	out, err := Command(cctx, p.sockPath, fmt.Sprintf("@!%d show info", workers[0]))
	if err != nil {
		p.log.Debug("haproxy: cannot read its connection limit", "error", err)
		return
	}
	maxConn, limit := infoInt(out, "Maxconn"), infoInt(out, "Ulimit-n")
	p.mu.Lock()
	prev := p.maxConn
	p.maxConn = maxConn
	p.mu.Unlock()
	if maxConn > 0 && maxConn < LowMaxConn && maxConn != prev {
		p.log.Warn("haproxy accepts few connections at once", "maxconn", maxConn, "open_files_limit", limit,
			"hint", fileLimitHint)
	}
}

// infoInt is the number of a `name: value` line of `show info` (0 when missing).
func infoInt(info, name string) int {
	for _, l := range strings.Split(info, "\n") {
		if k, v, ok := strings.Cut(l, ": "); ok && k == name {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return 0
}

// Restarts returns how many times the supervisor restarted HAProxy after it exited.
func (p *Process) Restarts() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.restarts
}

// supervise restarts HAProxy whenever the running instance exits, until Stop.
func (p *Process) supervise(in *instance) {
	defer close(p.supDone)
	delay := minBackoff
	for {
		select {
		case <-in.done:
		case <-p.life.Done():
			return
		}
		if p.life.Err() != nil {
			return
		}
		uptime := time.Since(in.started)
		if uptime >= stableAfter {
			delay = minBackoff
		}
		p.log.Error("haproxy exited; restarting", "pid", in.pid, "err", in.err,
			"uptime", uptime.Round(time.Millisecond), "delay", delay)
		p.kill(in) // workers that outlived the master would hold the ports

		for {
			if sleepCtx(p.life, delay) != nil {
				return
			}
			next, err := p.restart()
			delay = min(2*delay, maxBackoff)
			if err == nil {
				in = next
				break
			}
			if p.life.Err() != nil {
				return
			}
			p.log.Error("haproxy restart failed", "err", err, "retry_in", delay)
		}
	}
}

// restart launches HAProxy with the haproxy.cfg on disk and makes it the current instance.
func (p *Process) restart() (*instance, error) {
	if err := acquire(p.life, p.runSem); err != nil {
		return nil, err
	}
	defer release(p.runSem)
	ctx, cancel := context.WithTimeout(p.life, p.reloadTimeout)
	defer cancel()
	in, err := p.launch(ctx)
	if err != nil {
		return nil, err
	}
	if !p.markUp(in, nil, true) {
		p.kill(in)
		return nil, errStopped
	}
	p.log.Info("haproxy restarted", "pid", in.pid)
	return in, nil
}

// markUp makes in the current instance; with cfg non-nil it also records the served config.
// It refuses (false) after Stop or when in already exited.
func (p *Process) markUp(in *instance, cfg []byte, restart bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped || in.exited() {
		return false
	}
	p.cur = in
	close(p.up)
	p.started = true
	if cfg != nil {
		p.cfg, p.parsed = bytes.Clone(cfg), parsedServed{}
	}
	p.ov = newOverlay(p.cfg) // HAProxy loaded p.cfg, which is on disk
	if restart {
		p.restarts++
	}
	return true
}

// waitUp returns the running instance, waiting while the supervisor restarts HAProxy.
func (p *Process) waitUp(ctx context.Context) (*instance, error) {
	for {
		p.mu.Lock()
		in, up, started, stopped := p.cur, p.up, p.started, p.stopped
		p.mu.Unlock()
		switch {
		case stopped:
			return nil, errStopped
		case !started:
			return nil, errNotStarted
		case in != nil:
			return in, nil
		}
		select {
		case <-up:
		case <-p.life.Done():
			return nil, errStopped
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func (p *Process) setReloading(v bool) {
	p.mu.Lock()
	p.reloading = v
	p.mu.Unlock()
}

// launch starts an HAProxy master on haproxy.cfg and waits until it lists a worker. On failure
// nothing of it is left running.
func (p *Process) launch(ctx context.Context) (*instance, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(p.bin, "-W", "-db", "-f", p.cfgPath, "-S", p.sockPath+",mode,600")
	cmd.Env = haproxyEnv()
	cmd.Stdout, cmd.Stderr = w, w
	// Own process group: Stop can signal the master and every worker at once. Pdeathsig: the
	// master does not outlive this process (the workers follow their master).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	err = cmd.Start()
	w.Close()
	if err != nil {
		r.Close()
		return nil, fmt.Errorf("run %s: %w", p.bin, err)
	}
	in := &instance{cmd: cmd, pid: cmd.Process.Pid, started: time.Now(), done: make(chan struct{})}
	in.out.eof = make(chan struct{})
	go p.readOutput(r, in)
	go p.reap(in)

	if _, err := p.pollProc(ctx, in, func(info ProcInfo) bool { return len(info.Workers) > 0 }); err != nil {
		p.kill(in)
		if errors.Is(err, errExited) {
			alerts := withHints(in.out.alertsAfterExit())
			return nil, fmt.Errorf("%w during start (%v): %s", errExited, in.err, strings.Join(alerts, "; "))
		}
		return nil, fmt.Errorf("no worker: %w", err)
	}
	return in, nil
}

// reap waits for the master to exit and marks HAProxy down if in was the current instance.
func (p *Process) reap(in *instance) {
	err := in.cmd.Wait()
	p.mu.Lock()
	in.err = err
	if p.cur == in {
		p.cur = nil
		p.up = make(chan struct{})
	}
	p.mu.Unlock()
	close(in.done)
}

// kill sends SIGKILL to in's process group and waits (bounded) for the master to be reaped.
func (p *Process) kill(in *instance) {
	// The group id is the master's pid. The kernel keeps that pid unassigned while any worker of
	// the group lives, so this reaches only HAProxy processes; ESRCH means none is left.
	if err := syscall.Kill(-in.pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		p.log.Warn("haproxy: kill process group", "pgid", in.pid, "err", err)
	}
	select {
	case <-in.done:
	case <-time.After(killWait):
		p.log.Error("haproxy master not reaped after SIGKILL", "pid", in.pid)
	}
}

// pollProc asks the master of in for `show proc` until ok accepts the answer, in exits
// (errExited), Stop is called (errStopped) or ctx ends. Unreachable sockets are retried: the
// master CLI refuses connections while HAProxy re-executes itself.
func (p *Process) pollProc(ctx context.Context, in *instance, ok func(ProcInfo) bool) (ProcInfo, error) {
	tick := time.NewTicker(pollEvery)
	defer tick.Stop()
	var lastErr error
	for {
		select {
		case <-in.done:
			return ProcInfo{}, errExited
		case <-p.life.Done():
			return ProcInfo{}, errStopped
		case <-ctx.Done():
			if lastErr != nil {
				return ProcInfo{}, fmt.Errorf("%w (last: %v)", ctx.Err(), lastErr)
			}
			return ProcInfo{}, ctx.Err()
		default:
		}
		qctx, cancel := context.WithTimeout(ctx, time.Second)
		out, err := query(qctx, p.sockPath, "show proc", 0)
		cancel()
		if err == nil {
			var info ProcInfo
			if info, err = ParseShowProc(out); err == nil {
				// Another master on the same socket (a stale one) is not ours.
				if info.MasterPID == in.pid && ok(info) {
					return info, nil
				}
			}
		}
		lastErr = err
		select {
		case <-tick.C:
		case <-in.done:
		case <-p.life.Done():
		case <-ctx.Done():
		}
	}
}

// readOutput logs HAProxy's stdout and stderr with slog and keeps its ALERT lines for errors.
func (p *Process) readOutput(r *os.File, in *instance) {
	defer close(in.out.eof)
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		level, pid, text := splitLogLine(line)
		in.out.add(level, text)
		lvl := slogLevel(level)
		if routine(text) {
			lvl = min(lvl, slog.LevelInfo)
		}
		if p.life.Err() != nil {
			lvl = min(lvl, slog.LevelInfo) // after Stop, workers exiting is the expected news
		}
		p.log.Log(context.Background(), lvl, "haproxy", "pid", pid, "line", text)
	}
	// Never leave HAProxy blocked on a full pipe (a line over 1 MiB ends the scanner).
	_, _ = io.Copy(io.Discard, r)
}

// splitLogLine splits "[ALERT]    (1234) : text" into "ALERT", "1234", "text".
func splitLogLine(line string) (level, pid, text string) {
	rest, ok := strings.CutPrefix(line, "[")
	if !ok {
		return "", "", line
	}
	level, rest, ok = strings.Cut(rest, "]")
	if !ok {
		return "", "", line
	}
	rest = strings.TrimSpace(rest)
	if p, after, ok := strings.Cut(rest, ")"); ok && strings.HasPrefix(p, "(") {
		pid = strings.TrimPrefix(p, "(")
		rest = strings.TrimPrefix(strings.TrimSpace(after), ":")
	}
	return level, pid, strings.TrimSpace(rest)
}

// routine reports whether HAProxy's line is the normal news of a reload, which HAProxy prints as a
// warning: old proxies stopping, the old worker leaving, the master re-executing.
func routine(text string) bool {
	return (strings.HasPrefix(text, "Proxy ") && strings.Contains(text, " stopped (")) ||
		(strings.HasPrefix(text, "Former worker ") && strings.HasSuffix(text, "exited with code 0 (Exit)")) ||
		strings.HasPrefix(text, "Reexecuting Master process") ||
		strings.HasPrefix(text, "Stopping ") || strings.HasPrefix(text, "Loading success")
}

func slogLevel(level string) slog.Level {
	switch level {
	case "ALERT", "EMERG":
		return slog.LevelError
	case "WARNING":
		return slog.LevelWarn
	case "DEBUG":
		return slog.LevelDebug
	default:
		return slog.LevelInfo
	}
}

// maxAlerts is how many recent ALERT lines an instance keeps for error messages.
const maxAlerts = 20

// output collects what an error message needs from HAProxy's output.
type output struct {
	eof chan struct{} // closed when the output pipe is drained

	mu       sync.Mutex
	alerts   []string // the last maxAlerts ALERT lines
	nAlerts  int      // ALERT lines seen in total
	failures int      // "Loading failure!" lines seen
}

type outputMark struct{ alerts, failures int }

func (o *output) add(level, text string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if level == "ALERT" {
		o.nAlerts++
		o.alerts = append(o.alerts, text)
		if len(o.alerts) > maxAlerts {
			o.alerts = o.alerts[len(o.alerts)-maxAlerts:]
		}
	}
	if strings.HasPrefix(text, "Loading failure") {
		o.failures++
	}
}

func (o *output) mark() outputMark {
	o.mu.Lock()
	defer o.mu.Unlock()
	return outputMark{alerts: o.nAlerts, failures: o.failures}
}

// since returns the kept ALERT lines that came after m.
func (o *output) since(m outputMark) []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := min(o.nAlerts-m.alerts, len(o.alerts))
	return slices.Clone(o.alerts[len(o.alerts)-n:])
}

// failureAlerts returns the ALERT lines of a failed reload begun after m. The master CLI can
// report the failure before this process has read the lines: wait briefly for them.
func (o *output) failureAlerts(m outputMark) []string {
	deadline := time.Now().Add(500 * time.Millisecond)
	for time.Now().Before(deadline) {
		o.mu.Lock()
		seen := o.failures > m.failures
		o.mu.Unlock()
		if seen {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	return o.since(m)
}

// fileLimitHint follows HAProxy's alert when the open files limit is below what a config needs:
// one descriptor per connection on either side, and one per server it health-checks.
const fileLimitHint = "HAProxy holds a file descriptor for every server it health-checks and two per connection: " +
	"raise the open files limit (ulimit -n, docker run --ulimit nofile=N:N), or route services with skipCheck=true"

// withHints adds what to do to the alerts that need it.
func withHints(alerts []string) []string {
	for _, a := range alerts {
		if strings.Contains(a, "Cannot raise FD limit") || strings.Contains(a, "FD limit (ulimit-n)") {
			return append(alerts, fileLimitHint)
		}
	}
	return alerts
}

// alertsAfterExit returns the ALERT lines of an exited master, once its output is drained (or
// after a short wait when workers still hold the pipe).
func (o *output) alertsAfterExit() []string {
	select {
	case <-o.eof:
	case <-time.After(500 * time.Millisecond):
	}
	return o.since(outputMark{})
}

// validateFile runs `haproxy -c -f path`. Not -q: it silences the ALERT lines too.
func (p *Process) validateFile(ctx context.Context, path string) error {
	cmd := exec.CommandContext(ctx, p.bin, "-c", "-f", path)
	cmd.Env = haproxyEnv()
	out, err := cmd.CombinedOutput()
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return fmt.Errorf("haproxy validate: %w", ctx.Err())
	}
	var exit *exec.ExitError
	if !errors.As(err, &exit) {
		return fmt.Errorf("haproxy validate: run %s: %w", p.bin, err)
	}
	var alerts []string
	for _, line := range strings.Split(string(out), "\n") {
		if level, _, text := splitLogLine(strings.TrimSpace(line)); level == "ALERT" {
			alerts = append(alerts, "[ALERT] "+strings.ReplaceAll(text, path, "config"))
		}
	}
	msg := strings.Join(alerts, "\n")
	if msg == "" {
		msg = strings.TrimSpace(strings.ReplaceAll(string(out), path, "config"))
	}
	if msg == "" {
		msg = exit.String()
	}
	return &ConfigError{Output: msg}
}

// mallocEnv makes glibc's malloc, in HAProxy, back its heap with transparent huge pages (where
// the kernel allows them on request, as Debian's default "madvise" does) and grow it 64 MB at a
// time. HAProxy allocates some 8 KB per backend and 4 KB per server while it parses its config:
// with 10,000 backends of three servers, 4 KB pages cost some 50,000 page faults, most of the
// time of every check, start and reload (0.65 s on a 2-core VM); huge pages take that to 0.13 s,
// for the same memory. Small configs are not slower. The top pad goes in its own variable: glibc
// cuts GLIBC_TUNABLES after its first tunable in the environment it hands on, which HAProxy's
// master re-executes itself with on a reload.
var mallocEnv = []string{"GLIBC_TUNABLES=glibc.malloc.hugetlb=1", "MALLOC_TOP_PAD_=67108864"}

// haproxyEnv is the environment HAProxy runs with: this process's, with each variable of mallocEnv
// that is not set already (the operator's choice wins).
func haproxyEnv() []string {
	env := os.Environ()
	for _, kv := range mallocEnv {
		name, _, _ := strings.Cut(kv, "=")
		if _, ok := os.LookupEnv(name); !ok {
			env = append(env, kv)
		}
	}
	return env
}

// writeTemp writes data to a new temp file in Dir (created if missing) and returns its path.
func (p *Process) writeTemp(data []byte) (string, error) {
	if err := os.MkdirAll(p.dir, 0o755); err != nil {
		return "", err
	}
	if err := p.writeMaps(data); err != nil {
		return "", err
	}
	f, err := os.CreateTemp(p.dir, ".haproxy-*.cfg")
	if err != nil {
		return "", err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return "", err
	}
	return f.Name(), nil
}

// writeFile replaces path with data atomically (temp file + rename).
func (p *Process) writeFile(path string, data []byte) error {
	tmp, err := p.writeTemp(data)
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// acquire takes a one-slot semaphore, giving up when ctx ends.
func acquire(ctx context.Context, sem chan struct{}) error {
	select {
	case sem <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func release(sem chan struct{}) { <-sem }

// sleepCtx waits d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
