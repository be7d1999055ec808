// Command docker-flow-proxy runs the proxy (`server`) and talks to a running one (`reconfigure`,
// `remove`). Every flag can also be set through the environment variable named in its help.
package main

import (
	"context"
	"fmt"
	stdlog "log"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/docker-flow-proxy/docker-flow-proxy/consul"
	"github.com/docker-flow-proxy/docker-flow-proxy/haproxy"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
	"github.com/docker-flow-proxy/docker-flow-proxy/server"
	"github.com/docker-flow-proxy/docker-flow-proxy/templates"
)

func main() {
	if err := newApp().Run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "docker-flow-proxy:", err)
		os.Exit(1)
	}
}

func newApp() *cli.App {
	return &cli.App{
		Name:  "docker-flow-proxy",
		Usage: "HAProxy reconfigured on demand from Consul",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "log-level", Value: "info", EnvVars: []string{"LOG_LEVEL"}, Usage: "debug, info, warn or error"},
			&cli.StringFlag{Name: "log-format", Value: "text", EnvVars: []string{"LOG_FORMAT"}, Usage: "text or json"},
		},
		Commands: []*cli.Command{serverCommand(), registratorCommand(), reconfigureCommand(), removeCommand()},
	}
}

func logger(c *cli.Context) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch c.String("log-format") {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	default:
		return nil, fmt.Errorf("--log-format: %q is not text or json", c.String("log-format"))
	}
}

func serverCommand() *cli.Command {
	return &cli.Command{
		Name:  "server",
		Usage: "run the proxy: HAProxy, its configuration from Consul, and the HTTP API",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "consul-address", Value: "127.0.0.1:8500", EnvVars: []string{"CONSUL_ADDRESS"},
				Usage: "Consul agents as a comma list; the next one is tried when one fails"},
			&cli.StringFlag{Name: "proxy-instance-name", Value: "docker-flow", EnvVars: []string{"PROXY_INSTANCE_NAME"},
				Usage: "the route table's KV prefix: proxies with the same name serve the same routes"},
			&cli.StringFlag{Name: "bind-address", EnvVars: []string{"BIND_ADDRESS"},
				Usage: "address HAProxy and the API listen on (default: every address)"},
			&cli.IntFlag{Name: "http-port", Value: 80, EnvVars: []string{"HTTP_PORT"}, Usage: "HAProxy's HTTP port"},
			&cli.IntFlag{Name: "https-port", Value: 443, EnvVars: []string{"HTTPS_PORT"},
				Usage: "HAProxy's HTTPS port, served when the certificates folder holds a PEM file"},
			&cli.IntFlag{Name: "api-port", Value: 8080, EnvVars: []string{"API_PORT"}, Usage: "the HTTP API's port"},
			&cli.StringFlag{Name: "config-dir", Value: "/var/lib/docker-flow-proxy", EnvVars: []string{"CONFIG_DIR"},
				Usage: "folder of haproxy.cfg and HAProxy's sockets"},
			&cli.StringFlag{Name: "templates-dir", Value: "/etc/docker-flow-proxy/templates", EnvVars: []string{"TEMPLATES_DIR"},
				Usage: "folder of custom templates"},
			&cli.StringFlag{Name: "certs-dir", Value: "/etc/docker-flow-proxy/certs", EnvVars: []string{"CERTS_DIR"},
				Usage: "folder of PEM certificates (certificate and key) served on the HTTPS port, chosen by SNI"},
			&cli.IntFlag{Name: "stats-port", EnvVars: []string{"STATS_PORT"},
				Usage: "serve HAProxy's stats page (/) and Prometheus exporter (/metrics) on this port (0: off)"},
			&cli.StringFlag{Name: "stats-user", EnvVars: []string{"STATS_USER"}, Usage: "the stats page's user (required with --stats-port)"},
			&cli.StringFlag{Name: "stats-pass", EnvVars: []string{"STATS_PASS"}, Usage: "the stats page's password (required with --stats-port)"},
			&cli.BoolFlag{Name: "no-watch", EnvVars: []string{"NO_WATCH"},
				Usage: "do not follow Consul: change HAProxy only on reconfigure, remove and reload (the original's behaviour)"},
			&cli.IntFlag{Name: "consul-node-watches", Value: consul.DefaultNodeWatchLimit, EnvVars: []string{"CONSUL_NODE_WATCHES"},
				Usage: "follow each Consul node's services with a connection of its own up to this many nodes; above it, one connection follows them all (Consul allows 200 connections per client by default)"},
			&cli.IntFlag{Name: "spare-backends", Value: haproxy.DefaultSpareBackends, EnvVars: []string{"SPARE_BACKENDS"},
				Usage: "empty backends that serve new plain routes through HAProxy's runtime API until a reload gives them their own: that many new routes in a row wait for no reload (0: none)"},
			&cli.StringFlag{Name: "service-health", Value: "passing", EnvVars: []string{"SERVICE_HEALTH"},
				Usage: "which instances receive traffic: passing (all checks pass), warning (passing or warning) or any"},
			&cli.StringFlag{Name: "haproxy-bin", Value: "haproxy", EnvVars: []string{"HAPROXY_BIN"}, Usage: "the HAProxy binary"},
			&cli.IntFlag{Name: "haproxy-threads", EnvVars: []string{"HAPROXY_THREADS"},
				Usage: "HAProxy's threads (nbthread, 1-64); 0: HAProxy's default, one per CPU it may run on (it does not see a CPU quota such as docker run --cpus: set it there)"},
			&cli.DurationFlag{Name: "check-interval", EnvVars: []string{"CHECK_INTERVAL"},
				Usage: "time between two health checks of an instance by HAProxy, for routes without skipCheck; 0: automatic, HAProxy's 2s doubled until HAProxy checks at most 2,000 instances a second (4s above 4,000 checked instances, 8s above 8,000, ...)"},
			&cli.BoolFlag{Name: "retry-empty-response", EnvVars: []string{"RETRY_EMPTY_RESPONSE"},
				Usage: "send a GET, HEAD or OPTIONS request again to another instance when the one it went to closed the connection without answering (an instance stopping); HAProxy then copies every request, some 8% more of its CPU per request"},
			&cli.DurationFlag{Name: "startup-timeout", Value: 30 * time.Second, EnvVars: []string{"STARTUP_TIMEOUT"},
				Usage: "how long start-up waits for Consul before serving an empty route table"},
			&cli.StringFlag{Name: "users", EnvVars: []string{"USERS"},
				Usage: "user:password comma list: every route without users of its own asks for these (HTTP basic auth); " +
					"a password of the form $6$... is a SHA-512 crypt hash"},
		},
		Action: runServer,
	}
}

func runServer(c *cli.Context) error {
	log, err := logger(c)
	if err != nil {
		return err
	}
	health, err := consul.ParseHealthFilter(c.String("service-health"))
	if err != nil {
		return fmt.Errorf("--service-health: %w", err)
	}
	services, err := route.FromEnv(os.Environ())
	if err != nil {
		return err
	}
	// The consul-template library logs through the standard logger: its lines join ours.
	stdlog.SetFlags(0)
	stdlog.SetOutput(templates.LogWriter(log))
	ctx, stop := signal.NotifyContext(c.Context, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	srv, err := server.Start(ctx, server.Config{
		ConsulAddresses:    splitComma(c.String("consul-address")),
		InstanceName:       c.String("proxy-instance-name"),
		BindAddress:        c.String("bind-address"),
		HTTPPort:           c.Int("http-port"),
		HTTPSPort:          c.Int("https-port"),
		APIPort:            c.Int("api-port"),
		ConfigDir:          c.String("config-dir"),
		TemplatesDir:       c.String("templates-dir"),
		CertsDir:           c.String("certs-dir"),
		Health:             health,
		HAProxyBin:         c.String("haproxy-bin"),
		HAProxyThreads:     c.Int("haproxy-threads"),
		CheckInterval:      c.Duration("check-interval"),
		RetryEmptyResponse: c.Bool("retry-empty-response"),
		StartupTimeout:     c.Duration("startup-timeout"),
		Users:              c.String("users"),
		NoWatch:            c.Bool("no-watch"),
		NodeWatchLimit:     zeroIsNone(c.Int("consul-node-watches")),
		SpareBackends:      zeroIsNone(c.Int("spare-backends")),
		Services:           services,
		StatsPort:          c.Int("stats-port"),
		StatsUser:          c.String("stats-user"),
		StatsPass:          c.String("stats-pass"),
		Logger:             log,
	})
	if err != nil {
		return err
	}
	<-ctx.Done()
	log.Info("stopping", "reason", context.Cause(ctx))
	stopCtx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return srv.Stop(stopCtx)
}

func splitComma(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// zeroIsNone maps a count flag, where 0 is none (--consul-node-watches 0: no node has a watch of
// its own; --spare-backends 0: no spare), to server.Config, where 0 is the default and a negative
// number is none.
func zeroIsNone(n int) int {
	if n <= 0 {
		return -1
	}
	return n
}
