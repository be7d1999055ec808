// Package server assembles docker-flow-proxy: the Consul client, the controller, HAProxy under its
// control and the HTTP API. The binary's `server` command and the integration tests both run it.
package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/api"
	"github.com/docker-flow-proxy/docker-flow-proxy/consul"
	"github.com/docker-flow-proxy/docker-flow-proxy/haproxy"
	"github.com/docker-flow-proxy/docker-flow-proxy/metrics"
	"github.com/docker-flow-proxy/docker-flow-proxy/proxy"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
	"github.com/docker-flow-proxy/docker-flow-proxy/templates"
)

// Config is everything the server is started with.
type Config struct {
	ConsulAddresses []string
	// InstanceName is the KV prefix of the route table; proxies with different names share nothing.
	InstanceName string
	// BindAddress is where HAProxy and the API listen; empty means every address.
	BindAddress  string
	HTTPPort     int
	HTTPSPort    int
	APIPort      int
	ConfigDir    string
	TemplatesDir string
	CertsDir     string
	Health       consul.HealthFilter
	HAProxyBin   string
	// StartupTimeout bounds how long start-up waits for Consul before serving an empty table
	// (the routes are then loaded as soon as Consul answers).
	StartupTimeout time.Duration
	// Users (USERS) is a comma list of user:password; when set, every route that lists no users of
	// its own asks for one of these. A password of the form $6$... is a SHA-512 crypt hash.
	Users string
	// StatsPort, when set, serves HAProxy's stats page and Prometheus exporter (/metrics) behind
	// StatsUser and StatsPass, which are then required: there is no default password.
	StatsPort int
	StatsUser string
	StatsPass string
	// Services are routes defined at start (DFP_SERVICE_* environment variables): served next to
	// the routes of KV, never written to it, not changeable through the API.
	Services []route.EnvRoute
	// NoWatch turns off following Consul (the original's behaviour): HAProxy then changes only on
	// reconfigure, remove and reload requests.
	NoWatch bool
	// NodeWatchLimit is the number of Consul nodes up to which each node's services are followed
	// by a blocking query of their own; above it one query follows them all (0: the default,
	// consul.DefaultNodeWatchLimit; negative: one query whatever the number of nodes).
	NodeWatchLimit int
	// SpareBackends is how many empty backends HAProxy carries to serve new plain routes through its
	// runtime API, before the reload that gives them their own (0: the default,
	// haproxy.DefaultSpareBackends; negative: none, every new route waits for a reload).
	SpareBackends int
	// HAProxyThreads is HAProxy's number of threads (nbthread; 0: HAProxy's default, one per CPU).
	HAProxyThreads int
	// CheckInterval is the time between two health checks of an instance by HAProxy, for the
	// routes without skipCheck (0: automatic, haproxy.AutoCheckInterval: 2 s, lengthened in steps
	// as the checked instances grow; at least MinCheckInterval otherwise).
	CheckInterval time.Duration
	// RetryEmptyResponse has HAProxy send a GET, HEAD or OPTIONS request again to another instance
	// when the one it went to closed the connection without answering (haproxy.Settings).
	RetryEmptyResponse bool
	Logger             *slog.Logger
}

// MinCheckInterval and MaxCheckInterval bound Config.CheckInterval.
const (
	MinCheckInterval = 100 * time.Millisecond
	MaxCheckInterval = time.Hour
)

// Server is a running docker-flow-proxy.
type Server struct {
	cfg      Config
	log      *slog.Logger
	consul   *consul.Client
	haproxy  *haproxy.Process
	proxy    *proxy.Proxy
	catalog  *catalogFilter
	api      *http.Server
	apiAddr  string
	outage   outage
	metrics  *metrics.Metrics
	certs    *consul.CertStore
	certMu   sync.Mutex // held while a certificate is written and served
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	stopOnce sync.Once
}

// Start loads the route table from Consul, starts HAProxy serving it and then the API. It returns
// once both serve.
func Start(ctx context.Context, cfg Config) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.InstanceName == "" {
		cfg.InstanceName = "docker-flow"
	}
	if cfg.StartupTimeout == 0 {
		cfg.StartupTimeout = 30 * time.Second
	}
	if err := route.ValidateServiceName(cfg.InstanceName); err != nil {
		return nil, fmt.Errorf("proxy instance name: %w", err)
	}
	users, err := route.ParseUsers(cfg.Users)
	if err != nil {
		return nil, fmt.Errorf("users: %w", err)
	}
	if cfg.HAProxyThreads < 0 || cfg.HAProxyThreads > haproxy.MaxThreads {
		return nil, fmt.Errorf("haproxy threads: %d is not between 0 (HAProxy's default) and %d", cfg.HAProxyThreads, haproxy.MaxThreads)
	}
	if cfg.CheckInterval != 0 && (cfg.CheckInterval < MinCheckInterval || cfg.CheckInterval > MaxCheckInterval) {
		return nil, fmt.Errorf("check interval: %s is not 0 (automatic) nor between %s and %s",
			cfg.CheckInterval, MinCheckInterval, MaxCheckInterval)
	}
	var statsUser *route.User
	if cfg.StatsPort > 0 {
		if cfg.StatsUser == "" || cfg.StatsPass == "" {
			return nil, errors.New("stats: a stats port needs a user and a password (STATS_USER, STATS_PASS); there is no default")
		}
		u, err := route.ParseUsers(cfg.StatsUser + ":" + cfg.StatsPass)
		if err != nil || len(u) != 1 || u[0].Hashed() {
			return nil, fmt.Errorf("stats: the user or the password is not valid (%v)", err)
		}
		statsUser = &u[0]
	}
	if err := os.MkdirAll(cfg.ConfigDir, 0o755); err != nil {
		return nil, fmt.Errorf("config folder: %w", err)
	}
	raiseFileLimit(cfg.Logger)
	cfg.Logger.Info("docker-flow-proxy starting", "instance_name", cfg.InstanceName, "consul", strings.Join(cfg.ConsulAddresses, ","))

	cc, err := consul.New(cfg.ConsulAddresses, cfg.Logger)
	if err != nil {
		return nil, fmt.Errorf("consul client: %w", err)
	}
	settings := haproxy.DefaultSettings()
	settings.BindAddress = cfg.BindAddress
	settings.HTTPPort = cfg.HTTPPort
	settings.HTTPSPort = cfg.HTTPSPort
	settings.StatsSocket = filepath.Join(cfg.ConfigDir, "haproxy.sock")
	settings.MapsDir = filepath.Join(cfg.ConfigDir, "maps")
	settings.Users = users
	settings.Threads = cfg.HAProxyThreads
	settings.CheckInterval = cfg.CheckInterval
	settings.RetryEmptyResponse = cfg.RetryEmptyResponse
	if cfg.SpareBackends != 0 {
		settings.SpareBackends = max(0, cfg.SpareBackends)
	}
	settings.StatsPort, settings.StatsUser = cfg.StatsPort, statsUser
	if cfg.CertsDir != "" {
		if err := os.MkdirAll(cfg.CertsDir, 0o755); err != nil {
			// HTTPS is then off and certificates cannot be stored; HTTP still serves.
			cfg.Logger.Warn("could not create the certificates folder", "certs_dir", cfg.CertsDir, "error", err)
		}
		// HAProxy refuses `ssl crt` on a folder without certificates: the HTTPS bind comes with the
		// first one (RefreshCerts). The folder is read again once KV's certificates are written.
		settings.CertsDir = cfg.CertsDir
	}
	hap := haproxy.NewProcess(haproxy.Options{Binary: cfg.HAProxyBin, Dir: cfg.ConfigDir, Logger: cfg.Logger})
	catalog := &catalogFilter{c: cc, filter: cfg.Health}
	p := proxy.New(catalog, consul.NewStore(cc, cfg.InstanceName), hap, settings, cfg.Logger)
	m := metrics.New(metrics.Sources{HAProxyRestarts: hap.Restarts, HAProxyMaxConn: hap.MaxConn})
	p.SetObserver(m)
	hap.SetReloadHook(m.Reload)
	p.SetStatic(cfg.Services)
	if cfg.TemplatesDir != "" {
		p.SetTemplates(templates.New(cfg.TemplatesDir, cfg.ConsulAddresses, templates.DefaultTimeout, cfg.Logger))
	}

	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	s := &Server{cfg: cfg, log: cfg.Logger, consul: cc, haproxy: hap, proxy: p, catalog: catalog, cancel: cancel,
		certs: consul.NewCertStore(cc, cfg.InstanceName), metrics: m}

	loaded := true
	initial, err := s.loadWithRetry(ctx, cfg.StartupTimeout)
	if err != nil {
		s.log.Error("could not load the route table from consul; serving no route until it answers", "error", err)
		initial, loaded = p.Config(), false
	}
	if err := hap.Start(ctx, initial); err != nil {
		cancel()
		return nil, fmt.Errorf("start haproxy: %w", err)
	}
	m.Applied(time.Now())
	if !loaded {
		s.wg.Add(1)
		go func() { defer s.wg.Done(); s.loadInBackground(runCtx) }()
	}
	if !cfg.NoWatch {
		w := consul.NewWatcher(cc, consul.NewStore(cc, cfg.InstanceName), cfg.Health, cfg.Logger)
		if cfg.NodeWatchLimit != 0 {
			w.SetNodeWatchLimit(max(0, cfg.NodeWatchLimit))
		}
		if loaded {
			s.seed(w)
		}
		s.wg.Add(2)
		go func() { defer s.wg.Done(); _ = w.Run(runCtx) }()
		go func() { defer s.wg.Done(); s.follow(runCtx, w) }()
		if cfg.CertsDir != "" {
			s.wg.Add(1)
			go func() { defer s.wg.Done(); s.followCerts(runCtx) }()
		}
	}
	s.catalog.keepReads(false)

	l, err := net.Listen("tcp", net.JoinHostPort(cfg.BindAddress, strconv.Itoa(cfg.APIPort)))
	if err != nil {
		s.Stop(context.Background())
		return nil, fmt.Errorf("api listener: %w", err)
	}
	s.apiAddr = l.Addr().String()
	s.api = &http.Server{Handler: api.Handler(p, s, s, cfg.Logger, api.WithMetrics(m)), ReadHeaderTimeout: 10 * time.Second}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := s.api.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("api server stopped", "error", err)
		}
	}()
	s.log.Info("docker-flow-proxy serving", "api", s.apiAddr, "http_port", cfg.HTTPPort,
		"instance_name", cfg.InstanceName, "consul", strings.Join(cfg.ConsulAddresses, ","), "routes", len(p.Routes()))
	return s, nil
}

// loadWithRetry loads the route table, retrying while Consul does not answer, for at most timeout.
func (s *Server) loadWithRetry(ctx context.Context, timeout time.Duration) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	delay := 200 * time.Millisecond
	for {
		// Only the bulk read of the load that succeeds is kept (see seed).
		s.catalog.keepReads(true)
		err := s.writeCertsFromKV(ctx)
		var cfg []byte
		if err == nil {
			s.proxy.SetCerts(s.hasCerts())
			cfg, err = s.proxy.Load(ctx)
		}
		if err == nil {
			return cfg, nil
		}
		s.log.Warn("loading the route table failed; retrying", "error", err, "retry_in", delay)
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(delay):
		}
		delay = min(delay*2, 5*time.Second)
	}
}

// seed makes the watches of Consul start from what the load at start read: the route table's
// versions and the catalog (when the load read it in bulk), so that a new replica does not read
// them all again as its watches start. The watches report what changed since those reads.
func (s *Server) seed(w *consul.Watcher) {
	versions, index := s.proxy.LoadedKV()
	if err := w.SeedRoutes(versions, index); err != nil {
		s.log.Warn("the watch of KV reads the route table again", "error", err)
	}
	if read, reported := s.catalog.kept(); read != nil {
		if err := w.SeedCatalog(read, reported); err != nil {
			s.log.Warn("the watch of the catalog reads it again", "error", err)
		}
	}
}

// loadInBackground keeps trying to load the route table after a start without Consul.
func (s *Server) loadInBackground(ctx context.Context) {
	delay := time.Second
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		err := s.writeCertsFromKV(ctx)
		if err == nil {
			_, err = s.proxy.Load(ctx)
		}
		if err != nil {
			s.log.Warn("loading the route table failed; retrying", "error", err, "retry_in", delay)
			delay = min(delay*2, 30*time.Second)
			continue
		}
		// Served with the certificates just written from KV: HAProxy loads them again.
		if err := s.proxy.RefreshCerts(ctx, s.hasCerts()); err != nil {
			s.log.Error("applying the loaded route table failed", "error", err)
			continue
		}
		s.log.Info("route table loaded after consul came back", "routes", len(s.proxy.Routes()))
		return
	}
}

// APIAddr is the address the API listens on.
func (s *Server) APIAddr() string { return s.apiAddr }

// HAProxy is the HAProxy process under the server's control.
func (s *Server) HAProxy() *haproxy.Process { return s.haproxy }

// HAProxyRunning reports whether HAProxy runs a worker (for the health endpoint).
func (s *Server) HAProxyRunning() bool { return s.haproxy.Running() }

// ConsulPing reports whether Consul answers (for the health endpoint); during an outage that the
// watches saw, it says since when.
func (s *Server) ConsulPing(ctx context.Context) error {
	err := s.consul.Ping(ctx)
	if _, since := s.outage.get(); err != nil && !since.IsZero() {
		return sinceErr(since, err)
	}
	return err
}

// ConsulFollowed reports whether every watch of Consul reads it (for the health endpoint). A
// Consul that answers a ping may still fail some of them (too many connections from this
// address, one endpoint failing): the proxy then serves a state that may be behind the catalog.
func (s *Server) ConsulFollowed() error {
	if err, since := s.outage.get(); err != nil {
		return sinceErr(since, err)
	}
	return nil
}

// sinceErr is err of an outage that began at since, as the health endpoint says it.
func sinceErr(since time.Time, err error) error {
	return fmt.Errorf("since %s: %w", since.UTC().Format(time.RFC3339), err)
}

// Stop stops the API, then HAProxy, bounded by ctx.
func (s *Server) Stop(ctx context.Context) error {
	var err error
	s.stopOnce.Do(func() {
		s.cancel()
		if s.api != nil {
			if e := s.api.Shutdown(ctx); e != nil {
				err = fmt.Errorf("stop api: %w", e)
			}
		}
		if e := s.haproxy.Stop(ctx); e != nil && err == nil {
			err = fmt.Errorf("stop haproxy: %w", e)
		}
		s.wg.Wait()
		s.log.Info("docker-flow-proxy stopped")
	})
	return err
}

// catalogFilter reads instances with the health filter the server was started with. While the
// server loads the route table at start, it keeps its last bulk read of the catalog and the lists
// it gave, which the watch of the catalog then starts from (consul.Watcher.SeedCatalog).
type catalogFilter struct {
	c      *consul.Client
	filter consul.HealthFilter

	mu       sync.Mutex
	keep     bool
	read     *consul.CatalogRead
	reported map[string][]route.Instance
}

func (f *catalogFilter) Instances(ctx context.Context, service string) ([]route.Instance, error) {
	return f.c.Instances(ctx, service, f.filter)
}

// InstancesOf reads the instances of many services at once (the controller's bulk read).
func (f *catalogFilter) InstancesOf(ctx context.Context, services []string) (map[string][]route.Instance, error) {
	r, err := f.c.ReadCatalog(ctx)
	if err != nil {
		return nil, err
	}
	out, err := r.Instances(services, f.filter)
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	if f.keep {
		f.read, f.reported = r, out
	}
	f.mu.Unlock()
	return out, nil
}

// keepReads drops the read kept and keeps the next ones (keep), or none (stop keeping).
func (f *catalogFilter) keepReads(keep bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.keep, f.read, f.reported = keep, nil, nil
}

// kept returns the bulk read kept, if any, and what it listed.
func (f *catalogFilter) kept() (*consul.CatalogRead, map[string][]route.Instance) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.read, f.reported
}

// PutCert validates a certificate (chain and private key, PEM), stores it in KV under
// <instance>-certs/<name>, writes it to the certificates folder and makes HAProxy serve it with a
// validated reload. name is a file name (route.CertName). On any failure the folder and KV are
// left as they were and HAProxy keeps serving what it served.
func (s *Server) PutCert(ctx context.Context, name string, pem []byte) error {
	if s.cfg.CertsDir == "" {
		return errors.New("put certificate: no certificates folder is configured (CERTS_DIR)")
	}
	file, err := route.CertName(name)
	if err != nil {
		return err
	}
	if file != name {
		return &route.ParamError{Param: route.ParamCertName, Reason: fmt.Sprintf("%q does not end with .pem", name)}
	}
	if err := route.ValidateCert("body", pem); err != nil {
		return err
	}
	s.certMu.Lock()
	defer s.certMu.Unlock()

	path := filepath.Join(s.cfg.CertsDir, name)
	oldKV, hadKV, err := s.certs.Get(ctx, name)
	if err != nil {
		return fmt.Errorf("put certificate %s: %w: %w", name, proxy.ErrConsul, err)
	}
	oldFile, err := os.ReadFile(path)
	hadFile := err == nil
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("put certificate %s: %w", name, err)
	}
	if err := s.certs.Put(ctx, name, pem); err != nil {
		return fmt.Errorf("put certificate %s: %w: %w", name, proxy.ErrConsul, err)
	}
	undo := func(what error) error {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		var ferr, kerr error
		if hadFile {
			ferr = writeFileAtomic(path, oldFile)
		} else if e := os.Remove(path); e != nil && !errors.Is(e, os.ErrNotExist) {
			ferr = e
		}
		if hadKV {
			kerr = s.certs.Put(rctx, name, oldKV)
		} else {
			kerr = s.certs.Delete(rctx, name)
		}
		if ferr != nil || kerr != nil {
			s.log.Error("a certificate change failed and could not be undone", "cert", name, "error", what,
				"file_error", ferr, "kv_error", kerr)
		}
		return what
	}
	if err := writeFileAtomic(path, pem); err != nil {
		return undo(fmt.Errorf("put certificate %s: %w", name, err))
	}
	if err := s.proxy.RefreshCerts(ctx, s.hasCerts()); err != nil {
		var ce *haproxy.ConfigError
		if errors.As(err, &ce) {
			// The PEM passed Go's checks but HAProxy refuses it: the request is at fault.
			err = fmt.Errorf("%w: %w", proxy.ErrRejected, err)
		}
		return undo(fmt.Errorf("put certificate %s: %w", name, err))
	}
	s.log.Info("certificate stored and served", "cert", name)
	return nil
}

// CertNames lists the certificates HAProxy serves: the PEM files of the certificates folder.
func (s *Server) CertNames() ([]string, error) {
	if s.cfg.CertsDir == "" {
		return nil, nil
	}
	return pemFiles(s.cfg.CertsDir)
}

// writeCertsFromKV writes every certificate stored in KV to the certificates folder (a new replica
// then serves the certificates added to another one). Files that are not in KV are left alone.
func (s *Server) writeCertsFromKV(ctx context.Context) error {
	_, err := s.writeChangedCerts(ctx)
	return err
}

// writeChangedCerts writes the certificates of KV that the folder lacks or holds otherwise, and
// says how many it wrote.
func (s *Server) writeChangedCerts(ctx context.Context) (int, error) {
	if s.cfg.CertsDir == "" {
		return 0, nil
	}
	s.certMu.Lock()
	defer s.certMu.Unlock()
	certs, skipped, err := s.certs.List(ctx)
	if err != nil {
		return 0, fmt.Errorf("load certificates: %w: %w", proxy.ErrConsul, err)
	}
	written := 0
	for _, k := range skipped {
		s.log.Warn("skipping a KV key that is not a certificate name", "key", k)
	}
	for name, data := range certs {
		if err := route.ValidateCert(name, data); err != nil {
			s.log.Warn("skipping a certificate in KV that is not valid", "key", s.certs.Prefix()+"/"+name, "error", err)
			continue
		}
		path := filepath.Join(s.cfg.CertsDir, name)
		if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
			continue
		}
		if err := writeFileAtomic(path, data); err != nil {
			return written, fmt.Errorf("load certificates: %w", err)
		}
		written++
		s.log.Info("certificate written from KV", "cert", name)
	}
	return written, nil
}

// writeFileAtomic writes data to path with mode 0600 through a hidden temporary file in the same
// folder (HAProxy skips hidden files) and a rename: HAProxy never reads half a certificate.
func writeFileAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name()) // fails harmlessly once renamed
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

// pemFiles lists the *.pem files of dir, sorted.
func pemFiles(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if e.Type().IsRegular() && strings.HasSuffix(e.Name(), ".pem") && !strings.HasPrefix(e.Name(), ".") {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// hasCerts reports whether the certificates folder holds a certificate HAProxy would load.
func (s *Server) hasCerts() bool {
	if s.cfg.CertsDir == "" {
		return false
	}
	names, err := pemFiles(s.cfg.CertsDir)
	return err == nil && len(names) > 0
}

// raiseFileLimit lifts the soft open-files limit to the hard one: HAProxy derives its maxconn from it.
func raiseFileLimit(log *slog.Logger) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			log.Warn("could not raise the open files limit", "error", err)
		}
	}
}
