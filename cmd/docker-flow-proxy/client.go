package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/docker-flow-proxy/docker-flow-proxy/api"
)

func proxyAddressFlag() cli.Flag {
	return &cli.StringFlag{Name: "proxy-address", Value: "http://127.0.0.1:8080", EnvVars: []string{"PROXY_ADDRESS"},
		Usage: "the running proxy's API (scheme://host:port)"}
}

func timeoutFlag() cli.Flag {
	return &cli.DurationFlag{Name: "timeout", Value: 90 * time.Second, EnvVars: []string{"PROXY_TIMEOUT"},
		Usage: "how long to wait for the proxy's answer"}
}

func reconfigureCommand() *cli.Command {
	return &cli.Command{
		Name:  "reconfigure",
		Usage: "route paths to a service's instances, on a running proxy",
		Flags: []cli.Flag{
			proxyAddressFlag(), timeoutFlag(),
			&cli.StringFlag{Name: "service-name", Required: true, EnvVars: []string{"SERVICE_NAME"}, Usage: "the service (Consul name)"},
			&cli.StringFlag{Name: "service-path", Required: true, EnvVars: []string{"SERVICE_PATH"}, Usage: "paths as a comma list"},
			&cli.StringFlag{Name: "service-domain", EnvVars: []string{"SERVICE_DOMAIN"}, Usage: "domains as a comma list"},
			&cli.StringFlag{Name: "service-color", EnvVars: []string{"SERVICE_COLOR"}, Usage: "blue-green color: routes to <name>-<color>"},
			&cli.StringFlag{Name: "path-type", EnvVars: []string{"PATH_TYPE"}, Usage: "path_beg (default), path, path_end, path_reg or path_dir"},
			&cli.BoolFlag{Name: "skip-check", EnvVars: []string{"SKIP_CHECK"}, Usage: "no HAProxy health check of the instances"},
		},
		Action: func(c *cli.Context) error {
			q := url.Values{}
			q.Set("serviceName", c.String("service-name"))
			q.Set("servicePath", c.String("service-path"))
			for flag, param := range map[string]string{"service-domain": "serviceDomain", "service-color": "serviceColor", "path-type": "pathType"} {
				if v := c.String(flag); v != "" {
					q.Set(param, v)
				}
			}
			if c.Bool("skip-check") {
				q.Set("skipCheck", "true")
			}
			return call(c, "/v1/docker-flow-proxy/reconfigure", q)
		},
	}
}

func removeCommand() *cli.Command {
	return &cli.Command{
		Name:  "remove",
		Usage: "remove a service's route, on a running proxy",
		Flags: []cli.Flag{
			proxyAddressFlag(), timeoutFlag(),
			&cli.StringFlag{Name: "service-name", Required: true, EnvVars: []string{"SERVICE_NAME"}, Usage: "the service whose route goes"},
		},
		Action: func(c *cli.Context) error {
			q := url.Values{}
			q.Set("serviceName", c.String("service-name"))
			return call(c, "/v1/docker-flow-proxy/remove", q)
		},
	}
}

// call sends the request, prints the proxy's JSON answer and fails unless the proxy said OK.
func call(c *cli.Context, path string, q url.Values) error {
	base := strings.TrimRight(c.String("proxy-address"), "/")
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout"))
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+path+"?"+q.Encode(), nil)
	if err != nil {
		return fmt.Errorf("--proxy-address: %w", err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("%s: read answer: %w", path, err)
	}
	fmt.Fprintln(c.App.Writer, strings.TrimSpace(string(body)))
	var r api.Response
	if err := json.Unmarshal(body, &r); err != nil {
		return fmt.Errorf("%s: %s: the answer is not the proxy's JSON", path, resp.Status)
	}
	if r.Status != api.StatusOK {
		return fmt.Errorf("%s: %s: %s", path, resp.Status, r.Message)
	}
	return nil
}
