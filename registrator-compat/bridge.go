package registrator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"reflect"
	"sort"
	"strings"
	"time"
)

// Config is how the registrar runs.
type Config struct {
	Options
	// Resync (-resync) runs a full sync this often; 0 turns it off. Unchanged registrations are left alone.
	Resync time.Duration
	// Cleanup (-cleanup) deregisters services of this host whose container no longer runs, also
	// those left by an earlier run that crashed.
	Cleanup bool
	// DeregisterOnSuccess (-deregister on-success) keeps the services of a container that exited
	// with a non-zero code until the container is removed.
	DeregisterOnSuccess bool
	// RetryInterval is how soon failed Consul or Docker operations are tried again (doubling up to a minute).
	RetryInterval time.Duration
	Logger        *slog.Logger
}

// Bridge keeps the agent's registrations in step with the containers of one Docker engine.
type Bridge struct {
	docker Docker
	reg    Registry
	cfg    Config
	log    *slog.Logger

	// Owned by Run's goroutine.
	registered map[string]Service // what this registrar put in Consul, by service ID
	dirty      bool               // a change could not be applied: sync again soon
}

// NewBridge makes a registrar; Run starts it.
func NewBridge(d Docker, r Registry, cfg Config) *Bridge {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.RetryInterval <= 0 {
		cfg.RetryInterval = 2 * time.Second
	}
	return &Bridge{docker: d, reg: r, cfg: cfg, log: cfg.Logger, registered: map[string]Service{}}
}

// Run follows the engine's events until ctx ends. When the event stream breaks (the engine
// restarted), it reconnects with backoff and syncs again; it never gives up.
func (b *Bridge) Run(ctx context.Context) error {
	delay := b.cfg.RetryInterval
	for ctx.Err() == nil {
		if err := b.docker.Ping(ctx); err != nil {
			b.log.Warn("docker engine unreachable; retrying", "error", err, "retry_in", delay)
			sleep(ctx, delay)
			delay = min(delay*2, time.Minute)
			continue
		}
		delay = b.cfg.RetryInterval
		evctx, cancel := context.WithCancel(ctx)
		events, errs := b.docker.Events(evctx) // subscribe first: no start is missed during the sync
		b.sync(ctx)
		err := b.follow(ctx, events, errs)
		cancel()
		if ctx.Err() != nil {
			break
		}
		b.log.Warn("docker event stream closed; reconnecting", "error", err)
		sleep(ctx, delay)
	}
	return nil
}

func (b *Bridge) follow(ctx context.Context, events <-chan Event, errs <-chan error) error {
	var resync <-chan time.Time
	if b.cfg.Resync > 0 {
		t := time.NewTicker(b.cfg.Resync)
		defer t.Stop()
		resync = t.C
	}
	retryDelay := b.cfg.RetryInterval
	for {
		var retry <-chan time.Time
		if b.dirty {
			retry = time.After(retryDelay)
		}
		select {
		case ev, ok := <-events:
			if !ok {
				select {
				case err := <-errs:
					return err
				case <-time.After(time.Second):
					return errors.New("event stream closed")
				}
			}
			b.handle(ctx, ev)
		case err := <-errs:
			return err
		case <-resync:
			b.sync(ctx)
		case <-retry:
			b.log.Info("retrying the changes that could not be applied")
			b.sync(ctx)
			if b.dirty {
				retryDelay = min(retryDelay*2, time.Minute)
			} else {
				retryDelay = b.cfg.RetryInterval
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// handle applies one event at once; on failure the next sync puts things right.
func (b *Bridge) handle(ctx context.Context, ev Event) {
	switch ev.Action {
	case "start":
		c, st, found, err := b.docker.Inspect(ctx, ev.ContainerID)
		if err != nil {
			b.log.Warn("cannot read a started container", "container", short(ev.ContainerID), "error", err)
			b.dirty = true
			return
		}
		if !found || !st.Running {
			return
		}
		for _, s := range b.services(c) {
			b.register(ctx, s)
		}
	case "die":
		if b.cfg.DeregisterOnSuccess && ev.ExitCode != 0 {
			if _, _, found, err := b.docker.Inspect(ctx, ev.ContainerID); err != nil || found {
				b.log.Info("container failed; keeping its services (-deregister on-success)",
					"container", short(ev.ContainerID), "exit_code", ev.ExitCode)
				return
			}
		}
		for _, id := range b.ofContainer(ev.ContainerID) {
			b.deregister(ctx, id)
		}
	case "destroy":
		// A removed container's services go, whatever the deregister policy.
		for _, id := range b.ofContainer(ev.ContainerID) {
			b.deregister(ctx, id)
		}
	}
}

// sync makes the agent hold exactly the services of the running containers (and, with Cleanup,
// nothing else of this host). Registrations that already say the right thing are left alone, so
// watchers of the catalog are not woken for nothing.
func (b *Bridge) sync(ctx context.Context) {
	b.dirty = false
	ids, err := b.docker.Running(ctx)
	if err != nil {
		b.log.Warn("sync: cannot list containers", "error", err)
		b.dirty = true
		return
	}
	desired := map[string]Service{}
	runningNames := map[string]bool{}
	for _, id := range ids {
		c, st, found, err := b.docker.Inspect(ctx, id)
		if err != nil {
			b.log.Warn("sync: cannot read a container", "container", short(id), "error", err)
			b.dirty = true
			return
		}
		if !found || !st.Running {
			continue
		}
		runningNames[c.Name] = true
		for _, s := range b.services(c) {
			desired[s.ID] = s
		}
	}
	actual, err := b.reg.Services(ctx)
	if err != nil {
		b.log.Warn("sync: consul unreachable; changes wait until it answers", "error", err)
		b.dirty = true
		return
	}
	for _, id := range sortedKeys(desired) {
		s := desired[id]
		if a, ok := actual[id]; ok && a.Matches(s) {
			if prev, known := b.registered[id]; !known || reflect.DeepEqual(prev, s) {
				b.registered[id] = s
				continue
			}
		}
		b.register(ctx, s)
	}
	for _, id := range sortedKeys(b.registered) {
		if _, ok := desired[id]; ok {
			continue
		}
		if b.cfg.DeregisterOnSuccess && b.failedButPresent(ctx, b.registered[id].ContainerID) {
			continue
		}
		b.deregister(ctx, id)
	}
	if b.cfg.Cleanup {
		prefix := b.cfg.Hostname + ":"
		for _, id := range sortedKeys(actual) {
			if _, ok := desired[id]; ok || !strings.HasPrefix(id, prefix) {
				continue
			}
			parts := strings.Split(id, ":")
			if len(parts) < 3 || runningNames[parts[1]] {
				continue
			}
			b.log.Info("cleanup: deregistering a service whose container is gone", "service_id", id)
			b.deregister(ctx, id)
		}
	}
}

// failedButPresent reports whether a container exited with a non-zero code and still exists.
func (b *Bridge) failedButPresent(ctx context.Context, containerID string) bool {
	_, st, found, err := b.docker.Inspect(ctx, containerID)
	if err != nil {
		b.dirty = true
		return true // unsure: keep, and look again at the next sync
	}
	return found && !st.Running && st.ExitCode != 0
}

func (b *Bridge) services(c Container) []Service {
	services, warnings := Services(c, b.cfg.Options)
	for _, w := range warnings {
		b.log.Warn("container metadata", "container", c.Name, "warning", w)
	}
	return services
}

func (b *Bridge) register(ctx context.Context, s Service) {
	if err := b.reg.Register(ctx, s); err != nil {
		b.log.Warn("cannot register; will retry", "service_id", s.ID, "error", err)
		b.dirty = true
		return
	}
	b.registered[s.ID] = s
	b.log.Info("registered", "service_id", s.ID, "service", s.Name, "address", net.JoinHostPort(s.Address, fmt.Sprint(s.Port)))
}

func (b *Bridge) deregister(ctx context.Context, id string) {
	if err := b.reg.Deregister(ctx, id); err != nil {
		b.log.Warn("cannot deregister; will retry", "service_id", id, "error", err)
		b.dirty = true
		return
	}
	delete(b.registered, id)
	b.log.Info("deregistered", "service_id", id)
}

func (b *Bridge) ofContainer(containerID string) []string {
	var ids []string
	for id, s := range b.registered {
		if s.ContainerID == containerID {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	return ids
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// DetectHostIP returns the first IPv4 address of an interface that is up and is neither loopback nor
// one of Docker's bridges: the address registered for ports published on every address when -ip is
// not given. It falls back to 127.0.0.1.
func DetectHostIP() string {
	ifaces, err := net.Interfaces()
	if err != nil {
		return "127.0.0.1"
	}
	for _, ifc := range ifaces {
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 ||
			strings.HasPrefix(ifc.Name, "docker") || strings.HasPrefix(ifc.Name, "br-") || strings.HasPrefix(ifc.Name, "veth") {
			continue
		}
		addrs, _ := ifc.Addrs()
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil {
				return ipn.IP.String()
			}
		}
	}
	return "127.0.0.1"
}
