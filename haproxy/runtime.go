package haproxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"
)

// ErrNeedsReload means a config cannot be served through the runtime API: it differs from the one
// served in more than the servers of existing backends, or HAProxy's state is not known well enough.
// Nothing was changed; Apply (a reload) serves it.
var ErrNeedsReload = errors.New("the change needs a reload")

const (
	// runtimeCmdTimeout bounds one runtime API command.
	runtimeCmdTimeout = 5 * time.Second
	// delRetryFor bounds how long `del server` is retried while a removed server still has
	// connections (in-flight requests finishing, idle connections being released).
	delRetryFor = 3 * time.Second
)

// Server is one `server <Name> <Addr>[ check]` line of a backend.
type Server struct {
	Name  string
	Addr  string // host:port, "[v6]:port" for IPv6
	Check bool
}

// ServerChange is what changes in one backend: servers to add and servers to remove.
type ServerChange struct {
	Backend     string
	Add, Remove []Server
}

// DiffServers compares two configs as Render writes them. ok is true when they differ only in the
// server lines of backends both have (each line `server <name> <addr>[ check]`), when no server keeps
// its name with another address or check, and when every added server's address is an IP (HAProxy
// does not apply default-server settings, such as init-addr, to servers added at runtime). changes
// lists, per backend in the order of new, the servers to add and to remove; it is empty when the
// configs are equal.
func DiffServers(old, new []byte) (changes []ServerChange, ok bool) {
	o, ok1 := parseServers(old)
	n, ok2 := parseServers(new)
	if !ok1 || !ok2 || !bytes.Equal(o.skeleton, n.skeleton) {
		return nil, false
	}
	for _, be := range n.backends {
		before, after := o.servers[be], n.servers[be]
		ch := ServerChange{Backend: be}
		for _, s := range before {
			if _, kept := find(after, s.Name); !kept {
				ch.Remove = append(ch.Remove, s)
			}
		}
		for _, s := range after {
			prev, kept := find(before, s.Name)
			if kept {
				if prev != s {
					return nil, false
				}
				continue
			}
			host, _, err := net.SplitHostPort(s.Addr)
			if err != nil || net.ParseIP(host) == nil {
				return nil, false
			}
			ch.Add = append(ch.Add, s)
		}
		if len(ch.Add) > 0 || len(ch.Remove) > 0 {
			changes = append(changes, ch)
		}
	}
	return changes, true
}

func find(ss []Server, name string) (Server, bool) {
	for _, s := range ss {
		if s.Name == name {
			return s, true
		}
	}
	return Server{}, false
}

// parsedConfig is a config split into its server lines and everything else.
type parsedConfig struct {
	skeleton []byte              // every line but the server lines of backends
	backends []string            // backend names in order
	servers  map[string][]Server // by backend
}

// parseServers splits cfg. ok is false when a server line is not one Render writes, or a server
// name repeats in a backend.
func parseServers(cfg []byte) (parsedConfig, bool) {
	pc := parsedConfig{servers: map[string][]Server{}}
	var skel bytes.Buffer
	backend := ""
	for _, line := range strings.SplitAfter(string(cfg), "\n") {
		f := strings.Fields(line)
		if line != "" && line[0] != ' ' && line[0] != '\t' && len(f) > 0 {
			backend = ""
			if f[0] == "backend" && len(f) == 2 {
				backend = f[1]
				pc.backends = append(pc.backends, backend)
			}
		}
		if backend == "" || len(f) == 0 || f[0] != "server" {
			skel.WriteString(line)
			continue
		}
		if len(f) < 3 || len(f) > 4 || (len(f) == 4 && f[3] != "check") {
			return parsedConfig{}, false
		}
		s := Server{Name: f[1], Addr: f[2], Check: len(f) == 4}
		if _, dup := find(pc.servers[backend], s.Name); dup {
			return parsedConfig{}, false
		}
		pc.servers[backend] = append(pc.servers[backend], s)
	}
	pc.skeleton = skel.Bytes()
	return pc, true
}

// statsSocket returns the path of the config's `stats socket` in its global section ("" if none).
func statsSocket(cfg []byte) string {
	section := ""
	for _, line := range strings.Split(string(cfg), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		if line[0] != ' ' && line[0] != '\t' {
			section = f[0]
			continue
		}
		if section == "global" && len(f) >= 3 && f[0] == "stats" && f[1] == "socket" {
			return strings.TrimPrefix(f[2], "unix@")
		}
	}
	return ""
}

// UpdateServers makes HAProxy serve cfg without a reload, through the runtime API of the stats
// socket that cfg declares (level admin): servers are added, enabled (and their health checks with
// `check`), and removed (maintenance, then deleted once their connections are gone). cfg must differ
// from the config served only as DiffServers allows; otherwise it returns an error wrapping
// ErrNeedsReload and changes nothing. cfg is validated with `haproxy -c` first (a *ConfigError).
// On success cfg is on disk and Config returns it; the reload count does not change. On any other
// error HAProxy may be partly updated: the caller must Apply cfg (a reload), which repairs it. A cfg
// equal to the one served returns nil at once.
func (p *Process) UpdateServers(ctx context.Context, cfg []byte) error {
	if err := acquire(ctx, p.applySem); err != nil {
		return fmt.Errorf("haproxy update servers: %w", err)
	}
	defer release(p.applySem)

	p.mu.Lock()
	old, uncertain, started, in := p.cfg, p.uncertain, p.started, p.cur
	p.mu.Unlock()
	switch {
	case !started:
		return fmt.Errorf("haproxy update servers: %w", errNotStarted)
	case uncertain:
		return fmt.Errorf("haproxy update servers: %w: the config served is not known", ErrNeedsReload)
	case bytes.Equal(old, cfg):
		return nil
	case in == nil || in.exited():
		return fmt.Errorf("haproxy update servers: %w: haproxy is restarting", ErrNeedsReload)
	}
	changes, ok := DiffServers(old, cfg)
	if !ok {
		return fmt.Errorf("haproxy update servers: %w: more than servers changed", ErrNeedsReload)
	}
	sock := statsSocket(cfg)
	if sock == "" {
		return fmt.Errorf("haproxy update servers: %w: no stats socket", ErrNeedsReload)
	}
	if err := p.Validate(ctx, cfg); err != nil {
		return fmt.Errorf("haproxy update servers: %w", err)
	}

	if err := acquire(ctx, p.runSem); err != nil {
		return fmt.Errorf("haproxy update servers: %w", err)
	}
	defer release(p.runSem)
	if in.exited() {
		return fmt.Errorf("haproxy update servers: %w: haproxy exited", ErrNeedsReload)
	}
	t0 := time.Now()
	added, removed, err := p.changeServers(ctx, sock, changes)
	if err == nil {
		err = p.writeFile(p.cfgPath, cfg)
	}
	if err != nil {
		// HAProxy may serve neither config: never skip the next Apply as "already served".
		p.mu.Lock()
		p.uncertain = true
		p.mu.Unlock()
		return fmt.Errorf("haproxy update servers: %w", err)
	}
	p.mu.Lock()
	p.cfg = bytes.Clone(cfg)
	p.mu.Unlock()
	p.log.Info("haproxy servers changed without a reload", "added", added, "removed", removed,
		"duration", time.Since(t0).Round(time.Millisecond))
	return nil
}

// changeServers adds every new server first (so a backend whose servers are replaced never goes
// empty), then puts the removed ones in maintenance (no new requests; in-flight ones finish) and
// deletes them once their connections are gone.
func (p *Process) changeServers(ctx context.Context, sock string, changes []ServerChange) (added, removed int, err error) {
	waits := 0
	for _, ch := range changes {
		for _, s := range ch.Add {
			id := ch.Backend + "/" + s.Name
			cmd := "add server " + id + " " + s.Addr
			if s.Check {
				cmd += " check"
			}
			if err := runtimeCmd(ctx, sock, cmd, "New server registered."); err != nil {
				return added, removed, err
			}
			added++
			if s.Check {
				if err := runtimeCmd(ctx, sock, "enable health "+id, ""); err != nil {
					return added, removed, err
				}
				// Consul already reports the instance healthy: serve it now rather than after
				// HAProxy's first check (up to its interval later). A failing check still takes it out.
				if err := runtimeCmd(ctx, sock, "set server "+id+" health up", ""); err != nil {
					return added, removed, err
				}
			}
			if err := runtimeCmd(ctx, sock, "enable server "+id, ""); err != nil {
				return added, removed, err
			}
		}
	}
	for _, ch := range changes {
		for _, s := range ch.Remove {
			if err := runtimeCmd(ctx, sock, "set server "+ch.Backend+"/"+s.Name+" state maint", ""); err != nil {
				return added, removed, err
			}
		}
	}
	giveUp := time.Now().Add(delRetryFor)
	for _, ch := range changes {
		for _, s := range ch.Remove {
			cmd := "del server " + ch.Backend + "/" + s.Name
			pause := 10 * time.Millisecond
			for {
				err := runtimeCmd(ctx, sock, cmd, "Server deleted.")
				if err == nil {
					break
				}
				if !strings.Contains(err.Error(), "still has connections") || time.Now().After(giveUp) {
					return added, removed, err
				}
				waits++
				if err := sleepCtx(ctx, pause); err != nil {
					return added, removed, err
				}
				pause = min(2*pause, 200*time.Millisecond)
			}
			removed++
		}
	}
	if waits > 0 {
		p.log.Info("haproxy: removed servers finished their connections", "waits", waits)
	}
	return added, removed, nil
}

// runtimeCmd sends cmd to the runtime API and checks that HAProxy answers want.
func runtimeCmd(ctx context.Context, sock, cmd, want string) error {
	cctx, cancel := context.WithTimeout(ctx, runtimeCmdTimeout)
	defer cancel()
	out, err := Command(cctx, sock, cmd)
	if err != nil {
		return err
	}
	if got := strings.TrimSpace(out); got != want {
		return fmt.Errorf("haproxy cli %q: %s", cmd, got)
	}
	return nil
}
