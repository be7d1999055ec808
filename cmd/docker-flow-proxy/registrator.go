package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	registrator "github.com/docker-flow-proxy/docker-flow-proxy/registrator-compat"
)

// registratorCommand takes Registrator's flags, in its single-dash style (-ip) as well as --ip, and
// its backend URI as the argument.
func registratorCommand() *cli.Command {
	return &cli.Command{
		Name:      "registrator",
		Usage:     "register this host's Docker containers in Consul, by Registrator's rules",
		ArgsUsage: "consul://host:8500 | consul-tls://host:8501 | consul-unix:///path/to/consul.sock",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "ip", EnvVars: []string{"REGISTRATOR_IP"}, Usage: "address to register for published ports (default: the binding's, or this host's)"},
			&cli.BoolFlag{Name: "internal", EnvVars: []string{"REGISTRATOR_INTERNAL"}, Usage: "register the containers' own addresses and exposed ports"},
			&cli.BoolFlag{Name: "explicit", EnvVars: []string{"REGISTRATOR_EXPLICIT"}, Usage: "register only ports named by SERVICE_NAME or SERVICE_<port>_NAME"},
			&cli.StringFlag{Name: "useIpFromLabel", Aliases: []string{"use-ip-from-label"}, EnvVars: []string{"REGISTRATOR_USE_IP_FROM_LABEL"}, Usage: "take the address from this container label"},
			&cli.IntFlag{Name: "resync", EnvVars: []string{"REGISTRATOR_RESYNC"}, Usage: "seconds between full syncs (0: none)"},
			&cli.IntFlag{Name: "retry-attempts", EnvVars: []string{"REGISTRATOR_RETRY_ATTEMPTS"}, Usage: "attempts to reach Consul at start (-1: forever)"},
			&cli.IntFlag{Name: "retry-interval", Value: 2000, EnvVars: []string{"REGISTRATOR_RETRY_INTERVAL"}, Usage: "milliseconds between attempts"},
			&cli.BoolFlag{Name: "cleanup", EnvVars: []string{"REGISTRATOR_CLEANUP"}, Usage: "remove this host's registrations whose container is gone"},
			&cli.StringFlag{Name: "deregister", Value: "always", EnvVars: []string{"REGISTRATOR_DEREGISTER"}, Usage: "always, or on-success: only when the container exited with 0 or was removed"},
			&cli.StringFlag{Name: "tags", EnvVars: []string{"REGISTRATOR_TAGS"}, Usage: "tags added to every service, as a comma list"},
			&cli.StringFlag{Name: "hostname", EnvVars: []string{"REGISTRATOR_HOSTNAME"}, Usage: "this host's name in service IDs (default: the host name)"},
		},
		Action: runRegistrator,
	}
}

func runRegistrator(c *cli.Context) error {
	log, err := logger(c)
	if err != nil {
		return err
	}
	uri := c.Args().First()
	if uri == "" {
		uri = os.Getenv("REGISTRATOR_URI")
	}
	if uri == "" {
		return errors.New("registrator: the registry URI is missing (e.g. consul://127.0.0.1:8500)")
	}
	if c.Args().Len() > 1 {
		return fmt.Errorf("registrator: unexpected arguments after %s: %v (flags go before the URI)", uri, c.Args().Slice()[1:])
	}
	cfg := registrator.Config{
		Options: registrator.Options{
			Hostname: c.String("hostname"), HostIP: c.String("ip"), DefaultIP: registrator.DetectHostIP(),
			Internal: c.Bool("internal"), Explicit: c.Bool("explicit"), UseIPFromLabel: c.String("useIpFromLabel"),
			Tags: splitComma(c.String("tags")),
		},
		Resync:        time.Duration(c.Int("resync")) * time.Second,
		Cleanup:       c.Bool("cleanup"),
		RetryInterval: time.Duration(c.Int("retry-interval")) * time.Millisecond,
		Logger:        log,
	}
	switch c.String("deregister") {
	case "always":
	case "on-success":
		cfg.DeregisterOnSuccess = true
	default:
		return fmt.Errorf("-deregister: %q is not always or on-success", c.String("deregister"))
	}
	if cfg.Hostname == "" {
		if cfg.Hostname, err = os.Hostname(); err != nil {
			return fmt.Errorf("host name: %w", err)
		}
	}
	if cfg.RetryInterval <= 0 {
		return fmt.Errorf("-retry-interval: must be positive")
	}
	reg, err := registrator.NewConsul(uri)
	if err != nil {
		return err
	}
	engine, err := registrator.NewEngine()
	if err != nil {
		return err
	}
	defer engine.Close()

	ctx, stop := signal.NotifyContext(c.Context, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	for attempt := 0; ; attempt++ {
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := reg.Ping(pctx)
		cancel()
		if err == nil {
			break
		}
		retries := c.Int("retry-attempts")
		if ctx.Err() != nil || (retries != -1 && attempt >= retries) {
			return fmt.Errorf("registrator: consul at %s: %w", uri, err)
		}
		log.Warn("consul unreachable; retrying", "uri", uri, "error", err, "attempt", attempt+1)
		select {
		case <-ctx.Done():
		case <-time.After(cfg.RetryInterval):
		}
	}
	log.Info("registrator running", "uri", uri, "hostname", cfg.Hostname, "internal", cfg.Internal,
		"ip", cfg.HostIP, "default_ip", cfg.DefaultIP, "cleanup", cfg.Cleanup, "resync", cfg.Resync)
	return registrator.NewBridge(engine, reg, cfg).Run(ctx)
}
