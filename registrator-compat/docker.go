package registrator

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/events"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/client"
	"github.com/docker/docker/errdefs"
)

// Docker is what the registrar needs from the Docker engine.
type Docker interface {
	Ping(ctx context.Context) error
	// Running lists the IDs of the running containers.
	Running(ctx context.Context) ([]string, error)
	// Inspect reads a container; found is false when it no longer exists.
	Inspect(ctx context.Context, id string) (c Container, state State, found bool, err error)
	// Events streams container start, die and destroy events until ctx ends or the stream breaks.
	Events(ctx context.Context) (<-chan Event, <-chan error)
}

// State is a container's run state, for the deregister policy.
type State struct {
	Running  bool
	ExitCode int
}

// Event is a container starting, dying or being removed.
type Event struct {
	Action      string // "start", "die" or "destroy"
	ContainerID string
	ExitCode    int // for "die"
}

// Engine reads containers and events from a Docker engine through its API, negotiating the API version.
type Engine struct{ c *client.Client }

// NewEngine connects to the engine named by DOCKER_HOST (default: the local socket).
func NewEngine() (*Engine, error) {
	c, err := client.NewClientWithOpts(client.FromEnv, client.WithAPIVersionNegotiation())
	if err != nil {
		return nil, fmt.Errorf("docker client: %w", err)
	}
	return &Engine{c: c}, nil
}

// Close releases the client.
func (e *Engine) Close() error { return e.c.Close() }

// Ping checks that the engine answers.
func (e *Engine) Ping(ctx context.Context) error {
	if _, err := e.c.Ping(ctx); err != nil {
		return fmt.Errorf("docker ping: %w", err)
	}
	return nil
}

// Running lists the running containers' IDs.
func (e *Engine) Running(ctx context.Context) ([]string, error) {
	list, err := e.c.ContainerList(ctx, container.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("docker list containers: %w", err)
	}
	ids := make([]string, len(list))
	for i, c := range list {
		ids[i] = c.ID
	}
	return ids, nil
}

// Inspect reads a container and converts it for the rules.
func (e *Engine) Inspect(ctx context.Context, id string) (Container, State, bool, error) {
	info, err := e.c.ContainerInspect(ctx, id)
	if errdefs.IsNotFound(err) {
		return Container{}, State{}, false, nil
	}
	if err != nil {
		return Container{}, State{}, false, fmt.Errorf("docker inspect %s: %w", short(id), err)
	}
	c, st := convert(info)
	return c, st, true, nil
}

// Events streams container start, die and destroy events.
func (e *Engine) Events(ctx context.Context) (<-chan Event, <-chan error) {
	msgs, errs := e.c.Events(ctx, events.ListOptions{Filters: filters.NewArgs(
		filters.Arg("type", string(events.ContainerEventType)),
		filters.Arg("event", string(events.ActionStart)),
		filters.Arg("event", string(events.ActionDie)),
		filters.Arg("event", string(events.ActionDestroy)),
	)})
	out := make(chan Event)
	outErr := make(chan error, 1)
	go func() {
		defer close(out)
		for {
			select {
			case m := <-msgs:
				ev := Event{Action: string(m.Action), ContainerID: m.Actor.ID}
				if code, err := strconv.Atoi(m.Actor.Attributes["exitCode"]); err == nil {
					ev.ExitCode = code
				}
				select {
				case out <- ev:
				case <-ctx.Done():
					return
				}
			case err := <-errs:
				outErr <- fmt.Errorf("docker events: %w", err)
				return
			case <-ctx.Done():
				return
			}
		}
	}()
	return out, outErr
}

// convert takes what the rules need from `docker inspect`.
func convert(info container.InspectResponse) (Container, State) {
	c := Container{ID: info.ID, Name: strings.TrimPrefix(info.Name, "/")}
	var st State
	if info.State != nil {
		st = State{Running: info.State.Running, ExitCode: info.State.ExitCode}
	}
	if info.Config != nil {
		c.Image, c.Env, c.Labels = info.Config.Image, info.Config.Env, info.Config.Labels
	}
	hostNetwork := info.HostConfig != nil && info.HostConfig.NetworkMode.IsHost()
	exposed := map[string]bool{}
	if info.Config != nil {
		for p := range info.Config.ExposedPorts {
			exposed[string(p)] = true
		}
	}
	if ns := info.NetworkSettings; ns != nil {
		names := make([]string, 0, len(ns.Networks))
		for n := range ns.Networks {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			if ep := ns.Networks[n]; ep != nil && ep.IPAddress != "" {
				c.IP = ep.IPAddress
				break
			}
		}
		for p, bindings := range ns.Ports {
			exposed[string(p)] = true
			port, proto := splitPort(string(p))
			if port == 0 {
				continue
			}
			for _, b := range bindings {
				hp, _ := strconv.Atoi(b.HostPort)
				c.Ports = append(c.Ports, Port{ExposedPort: port, Proto: proto, HostIP: b.HostIP, HostPort: hp})
			}
			if len(bindings) > 0 {
				delete(exposed, string(p))
			}
		}
	}
	for p := range exposed {
		port, proto := splitPort(p)
		if port == 0 {
			continue
		}
		host := 0
		if hostNetwork {
			// On the host's network an exposed port is the host's port.
			host = port
		}
		c.Ports = append(c.Ports, Port{ExposedPort: port, Proto: proto, HostPort: host})
	}
	sort.Slice(c.Ports, func(i, j int) bool {
		a, b := c.Ports[i], c.Ports[j]
		if a.ExposedPort != b.ExposedPort {
			return a.ExposedPort < b.ExposedPort
		}
		if a.Proto != b.Proto {
			return a.Proto < b.Proto
		}
		return a.HostIP < b.HostIP
	})
	return c, st
}

// splitPort reads "8080/tcp".
func splitPort(p string) (int, string) {
	num, proto, ok := strings.Cut(p, "/")
	if !ok {
		proto = "tcp"
	}
	n, err := strconv.Atoi(num)
	if err != nil || n <= 0 || n > 65535 {
		return 0, ""
	}
	return n, proto
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}
