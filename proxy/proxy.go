// Package proxy is the controller: it keeps the route table, turns it with the catalog's instances into
// haproxy.cfg and applies it, and keeps Consul KV, the source of truth, in step. Changes are applied
// one at a time.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/haproxy"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// Catalog lists the instances of a Consul service.
type Catalog interface {
	Instances(ctx context.Context, service string) ([]route.Instance, error)
}

// bulkCatalog is a Catalog that also lists the instances of many services with a number of
// requests that does not depend on their number. The controller uses it when it reads every
// route's instances (Load, Reload with recreate).
type bulkCatalog interface {
	InstancesOf(ctx context.Context, services []string) (map[string][]route.Instance, error)
}

// instancesOf reads the instances of every route of routes: in one bulk read when the catalog has
// it and more than one route is read, otherwise one read per route.
func (p *Proxy) instancesOf(ctx context.Context, routes []route.Route) (map[string][]route.Instance, error) {
	out := make(map[string][]route.Instance, len(routes))
	if bc, ok := p.catalog.(bulkCatalog); ok && len(routes) > 1 {
		names := make([]string, len(routes))
		for i, r := range routes {
			names[i] = r.ConsulService()
		}
		m, err := bc.InstancesOf(ctx, names)
		if err != nil {
			return nil, fmt.Errorf("load instances of %d services: %w: %w", len(names), ErrConsul, err)
		}
		for _, n := range names {
			out[n] = m[n]
		}
		return out, nil
	}
	for _, r := range routes {
		inst, err := p.catalog.Instances(ctx, r.ConsulService())
		if err != nil {
			return nil, fmt.Errorf("load instances of %s: %w: %w", r.ConsulService(), ErrConsul, err)
		}
		out[r.ConsulService()] = inst
	}
	return out, nil
}

// Store is the route table in Consul KV.
type Store interface {
	List(ctx context.Context) ([]route.Route, []error, error)
	Put(ctx context.Context, r route.Route) error
	Delete(ctx context.Context, service string) error
}

// HAProxy validates and applies configs. An HAProxy that also has UpdateServers (serverUpdater), as
// *haproxy.Process has, gets changes of instances only without a reload.
type HAProxy interface {
	Validate(ctx context.Context, cfg []byte) error
	Apply(ctx context.Context, cfg []byte) error
}

// Error kinds the API turns into status codes.
var (
	// ErrConsul wraps a failed Consul read or write: nothing was changed.
	ErrConsul = errors.New("consul")
	// ErrConfig wraps a config that HAProxy rejected: nothing was changed.
	ErrConfig = errors.New("haproxy rejected the config")
	// ErrRejected marks an ErrConfig caused by the change itself: the config served now passes
	// `haproxy -c`, the one with the change does not. The API answers it with 400.
	ErrRejected = errors.New("the change makes a config that HAProxy refuses")
	// ErrApply wraps a reload that failed: KV was restored, the old config keeps serving.
	ErrApply = errors.New("haproxy reload failed")
)

// Proxy is the controller. Create it with New; call Load before serving.
type Proxy struct {
	catalog  Catalog
	store    Store
	haproxy  HAProxy
	settings haproxy.Settings
	log      *slog.Logger

	mu       sync.Mutex               // held while a batch of changes is applied
	backends map[string]route.Backend // what HAProxy serves now

	qmu   sync.Mutex
	queue []*change // changes waiting for the next commit
}

// New makes a controller with an empty route table.
func New(catalog Catalog, store Store, hap HAProxy, settings haproxy.Settings, logger *slog.Logger) *Proxy {
	if logger == nil {
		logger = slog.Default()
	}
	return &Proxy{catalog: catalog, store: store, haproxy: hap, settings: settings, log: logger,
		backends: map[string]route.Backend{}}
}

// Load rebuilds the whole route table from KV and the catalog and returns the config that serves it.
// The caller starts HAProxy with that config. Routes in KV that are not valid are logged and skipped.
func (p *Proxy) Load(ctx context.Context) ([]byte, error) {
	routes, bad, err := p.store.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("load routes: %w: %w", ErrConsul, err)
	}
	for _, e := range bad {
		p.log.Warn("skipping a route in KV that is not valid", "error", e)
	}
	instances, err := p.instancesOf(ctx, routes)
	if err != nil {
		return nil, err
	}
	backends := make(map[string]route.Backend, len(routes))
	for _, r := range routes {
		backends[r.ServiceName] = route.Backend{Route: r, Instances: instances[r.ConsulService()]}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.backends = backends
	p.log.Info("route table loaded from consul", "routes", len(backends))
	return p.renderLocked(backends), nil
}

// Apply makes HAProxy serve the current route table (after Load, or to re-apply it).
func (p *Proxy) Apply(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.haproxy.Apply(ctx, p.renderLocked(p.backends)); err != nil {
		return fmt.Errorf("%w: %w", ErrApply, err)
	}
	return nil
}

// Config renders the route table as HAProxy serves it.
func (p *Proxy) Config() []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.renderLocked(p.backends)
}

// Routes returns the routes served, sorted by service name.
func (p *Proxy) Routes() []route.Backend {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]route.Backend, 0, len(p.backends))
	for _, b := range p.backends {
		out = append(out, b)
	}
	sortBackends(out)
	return out
}

// Reconfigure adds or replaces a route. It returns once HAProxy serves it, with the instances found.
// On any failure nothing changes: neither KV nor what HAProxy serves.
func (p *Proxy) Reconfigure(ctx context.Context, r route.Route) ([]route.Instance, error) {
	if err := r.Validate(); err != nil {
		return nil, err
	}
	c := &change{service: r.ServiceName, route: &r, done: make(chan error, 1)}
	if err := p.submit(ctx, c); err != nil {
		return nil, err
	}
	p.log.Info("route configured", "service", r.ServiceName, "consul_service", r.ConsulService(),
		"paths", r.ServicePath, "domains", r.ServiceDomain, "instances", len(c.instances))
	return c.instances, nil
}

// Remove deletes a route from HAProxy and KV. It reports whether the route was served.
func (p *Proxy) Remove(ctx context.Context, serviceName string) (bool, error) {
	if err := route.ValidateServiceName(serviceName); err != nil {
		return false, err
	}
	c := &change{service: serviceName, done: make(chan error, 1)}
	if err := p.submit(ctx, c); err != nil {
		return false, err
	}
	p.log.Info("route removed", "service", serviceName, "was_served", c.existed)
	return c.existed, nil
}

// change is one reconfigure (route set) or remove (route nil) waiting to be applied, or what a
// watch of Consul observed: a service's new instances, or a route written by another replica.
type change struct {
	service string
	route   *route.Route
	done    chan error
	// observed changes come from Consul: they are applied to HAProxy and never written back.
	observed bool
	// instancesOnly replaces the instances of a served route (c.instances), if it is served.
	instancesOnly bool
	// fromKV brings the served table to KV's (force: re-reading every route's instances); it is
	// expanded into subs when its batch is applied.
	fromKV, force bool
	subs          []*change

	// Filled in while the change is applied.
	instances []route.Instance
	existed   bool
	old       route.Backend
}

// submit queues a change and applies it. Changes that arrive while a reload runs are applied
// together by the next caller that takes the lock: one validation and one reload for all of them.
func (p *Proxy) submit(ctx context.Context, cs ...*change) error {
	p.qmu.Lock()
	p.queue = append(p.queue, cs...)
	p.qmu.Unlock()

	p.mu.Lock()
	p.qmu.Lock()
	batch := p.queue
	p.queue = nil
	p.qmu.Unlock()
	if len(batch) > 0 {
		// Once started, a commit is not abandoned because one caller went away: HAProxy, KV and the
		// route table must stay in step.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), commitTimeout)
		batch, parents := p.expandLocked(cctx, batch)
		p.commitLocked(cctx, batch)
		cancel()
		for _, parent := range parents {
			var first error
			for _, sub := range parent.subs {
				if err := <-sub.done; err != nil && first == nil {
					first = err
				}
			}
			parent.done <- first
		}
	}
	p.mu.Unlock()
	var first error
	for _, c := range cs {
		if err := <-c.done; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// UpdateInstances applies a service's instances as a watch of the catalog saw them. Every route
// whose Consul service it is gets them; nothing is written to KV. A change that yields the same
// config causes no reload.
func (p *Proxy) UpdateInstances(ctx context.Context, consulService string, inst []route.Instance) error {
	var cs []*change
	for _, b := range p.Routes() {
		// A list equal to the one served (the first report of a watch after Load) changes nothing.
		if b.Route.ConsulService() == consulService && !slices.Equal(b.Instances, inst) {
			cs = append(cs, &change{service: b.Route.ServiceName, observed: true, instancesOnly: true,
				instances: inst, done: make(chan error, 1)})
		}
	}
	if len(cs) == 0 {
		return nil
	}
	return p.submit(ctx, cs...)
}

// SyncFromKV makes the served routes those of the route table in KV (written by this or another
// replica): new and changed routes are served with their instances read from the catalog, routes
// no longer in KV are removed. The table is read while changes are applied one batch at a time, so it
// is never older than a change this proxy made. Nothing is written to KV.
func (p *Proxy) SyncFromKV(ctx context.Context) error {
	return p.submit(ctx, &change{fromKV: true, observed: true, done: make(chan error, 1)})
}

// Reload makes HAProxy load the route table again (and so the files it names, certificates among
// them). With recreate, the table is first rebuilt from KV and every route's instances are read
// again from the catalog.
func (p *Proxy) Reload(ctx context.Context, recreate bool) error {
	if !recreate {
		p.mu.Lock()
		defer p.mu.Unlock()
		cfg := p.renderLocked(p.backends)
		r, ok := p.haproxy.(reloader)
		if !ok {
			return p.haproxy.Apply(ctx, cfg)
		}
		if err := r.Reload(ctx, cfg); err != nil {
			return fmt.Errorf("%w: %w", ErrApply, err)
		}
		return nil
	}
	return p.submit(ctx, &change{fromKV: true, force: true, observed: true, done: make(chan error, 1)})
}

// expandLocked replaces each fromKV change by the changes that bring the served table to KV's: they
// come first, so that the batch's requests, newer than the table, apply after them.
func (p *Proxy) expandLocked(ctx context.Context, batch []*change) (expanded []*change, parents []*change) {
	var rest []*change
	for _, c := range batch {
		if !c.fromKV {
			rest = append(rest, c)
			continue
		}
		routes, bad, err := p.store.List(ctx)
		if err != nil {
			c.done <- fmt.Errorf("read route table: %w: %w", ErrConsul, err)
			continue
		}
		for _, e := range bad {
			p.log.Warn("skipping a route in KV that is not valid", "error", e)
		}
		current := make(map[string]route.Route, len(p.backends))
		for name, b := range p.backends {
			current[name] = b.Route
		}
		for _, r := range routes {
			if old, ok := current[r.ServiceName]; c.force || !ok || !old.Equal(r) {
				r := r
				c.subs = append(c.subs, &change{service: r.ServiceName, route: &r, observed: true, done: make(chan error, 1)})
			}
			delete(current, r.ServiceName)
		}
		for _, name := range sortedNames(current) {
			c.subs = append(c.subs, &change{service: name, observed: true, done: make(chan error, 1)})
		}
		if len(c.subs) == 0 {
			c.done <- nil
			continue
		}
		expanded = append(expanded, c.subs...)
		parents = append(parents, c)
	}
	return append(expanded, rest...), parents
}

func sortedNames(m map[string]route.Route) []string {
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// commitLocked applies a batch of changes in the order that keeps every failure harmless: read the
// instances, validate the config (nothing written yet), write KV, reload. If the reload fails, KV
// is put back and the old config keeps serving.
func (p *Proxy) commitLocked(ctx context.Context, batch []*change) {
	// The instances of many routes (a Reload with recreate) are read at once.
	var bulk map[string][]route.Instance
	var bulkErr error
	var toRead []route.Route
	for _, c := range batch {
		if c.route != nil && !c.instancesOnly {
			toRead = append(toRead, *c.route)
		}
	}
	if _, ok := p.catalog.(bulkCatalog); ok && len(toRead) > 1 {
		bulk, bulkErr = p.instancesOf(ctx, toRead)
	}
	var ready []*change
	for _, c := range batch {
		if c.route != nil && !c.instancesOnly {
			inst, ok := bulk[c.route.ConsulService()]
			err := bulkErr
			if !ok && err == nil {
				inst, err = p.catalog.Instances(ctx, c.route.ConsulService())
			}
			if err != nil {
				c.done <- fmt.Errorf("read instances of %s: %w: %w", c.route.ConsulService(), ErrConsul, err)
				continue
			}
			c.instances = inst
		}
		ready = append(ready, c)
	}
	if len(ready) == 0 {
		return
	}
	next := p.nextLocked(ready)
	cfg := p.renderLocked(next)
	if err := p.haproxy.Validate(ctx, cfg); err != nil {
		if len(ready) > 1 {
			// Find the change that HAProxy rejects: apply them one by one.
			for _, c := range ready {
				p.commitLocked(ctx, []*change{c})
			}
			return
		}
		if verr := p.haproxy.Validate(ctx, p.renderLocked(p.backends)); verr == nil {
			// The config served now passes: this change is what HAProxy refuses (a regex that PCRE
			// rejects, say). The request is at fault.
			p.log.Info("haproxy -c rejects the config of a change; nothing changed", "service", ready[0].service, "error", err)
			ready[0].done <- fmt.Errorf("%w: %w: %w", ErrConfig, ErrRejected, err)
			return
		}
		p.log.Error("rendered config rejected by haproxy -c; nothing changed", "error", err)
		ready[0].done <- fmt.Errorf("%w: %w", ErrConfig, err)
		return
	}
	var written []*change
	for _, c := range ready {
		if c.observed {
			written = append(written, c) // already in Consul
			continue
		}
		if err := p.write(ctx, c); err != nil {
			c.done <- fmt.Errorf("write route table: %w: %w", ErrConsul, err)
			continue
		}
		written = append(written, c)
	}
	if len(written) == 0 {
		return
	}
	if len(written) < len(ready) {
		// Some KV writes failed: serve only what KV holds.
		next = p.nextLocked(written)
		cfg = p.renderLocked(next)
	}
	if err := p.applyLocked(ctx, cfg); err != nil {
		err = fmt.Errorf("%w: %w", ErrApply, err)
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), restoreTimeout)
		defer cancel()
		for i := len(written) - 1; i >= 0; i-- {
			if written[i].observed {
				continue
			}
			if rerr := p.restore(rctx, written[i]); rerr != nil {
				p.log.Error("reload failed and KV could not be restored", "service", written[i].service, "error", err, "restore_error", rerr)
			}
		}
		for _, c := range written {
			c.done <- err
		}
		return
	}
	p.backends = next
	for _, c := range written {
		c.done <- nil
	}
}

// reloader is an HAProxy that can be made to load a config equal to the one it serves.
type reloader interface {
	Reload(ctx context.Context, cfg []byte) error
}

// SetCerts tells the controller whether the certificates folder holds a certificate, for the next
// config it renders (before HAProxy starts).
func (p *Proxy) SetCerts(hasCerts bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.settings.HasCerts = hasCerts
}

// RefreshCerts tells the controller whether the certificates folder holds a certificate, and makes
// HAProxy load the folder again (it reads certificates only when it loads its config): the HTTPS
// bind appears with the first certificate, and a new or replaced one is served.
func (p *Proxy) RefreshCerts(ctx context.Context, hasCerts bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	old := p.settings.HasCerts
	p.settings.HasCerts = hasCerts
	cfg := p.renderLocked(p.backends)
	var err error
	if r, ok := p.haproxy.(reloader); ok {
		err = r.Reload(ctx, cfg)
	} else {
		err = p.haproxy.Apply(ctx, cfg)
	}
	if err != nil {
		p.settings.HasCerts = old
		return fmt.Errorf("%w: %w", ErrApply, err)
	}
	return nil
}

// serverUpdater is an HAProxy that can change the servers of its backends without a reload.
type serverUpdater interface {
	UpdateServers(ctx context.Context, cfg []byte) error
}

// applyLocked makes HAProxy serve cfg. When cfg differs from the config of the table served only in
// the servers of existing backends, it goes through the runtime API (no reload); otherwise, or when
// that fails, by a validated reload, which also repairs a partly done runtime update.
func (p *Proxy) applyLocked(ctx context.Context, cfg []byte) error {
	up, ok := p.haproxy.(serverUpdater)
	if !ok {
		return p.haproxy.Apply(ctx, cfg)
	}
	changes, serversOnly := haproxy.DiffServers(p.renderLocked(p.backends), cfg)
	if serversOnly && len(changes) == 0 {
		return p.haproxy.Apply(ctx, cfg) // the same config: no reload, nothing to log
	}
	added, removed := 0, 0
	for _, c := range changes {
		added += len(c.Add)
		removed += len(c.Remove)
	}
	if serversOnly {
		err := up.UpdateServers(ctx, cfg)
		if err == nil {
			p.log.Info("haproxy updated", "path", "runtime-api", "backends", len(changes),
				"servers_added", added, "servers_removed", removed)
			return nil
		}
		lvl := slog.LevelWarn
		if errors.Is(err, haproxy.ErrNeedsReload) {
			lvl = slog.LevelInfo // refused before any change (no stats socket, say)
		}
		p.log.Log(ctx, lvl, "changing servers through the runtime API failed; reloading instead", "error", err)
	}
	if err := p.haproxy.Apply(ctx, cfg); err != nil {
		return err
	}
	p.log.Info("haproxy updated", "path", "reload", "servers_only", serversOnly,
		"servers_added", added, "servers_removed", removed)
	return nil
}

// nextLocked returns the route table with the changes applied in order, and records in each change
// what it replaces.
func (p *Proxy) nextLocked(changes []*change) map[string]route.Backend {
	next := make(map[string]route.Backend, len(p.backends)+len(changes))
	for k, v := range p.backends {
		next[k] = v
	}
	for _, c := range changes {
		c.old, c.existed = next[c.service]
		if c.instancesOnly {
			if c.existed {
				next[c.service] = route.Backend{Route: c.old.Route, Instances: c.instances}
			}
			continue
		}
		if c.route == nil {
			delete(next, c.service)
		} else {
			next[c.service] = route.Backend{Route: *c.route, Instances: c.instances}
		}
	}
	return next
}

func (p *Proxy) write(ctx context.Context, c *change) error {
	if c.route == nil {
		return p.store.Delete(ctx, c.service)
	}
	return p.store.Put(ctx, *c.route)
}

// restore puts back in KV what a change replaced.
func (p *Proxy) restore(ctx context.Context, c *change) error {
	if c.existed {
		return p.store.Put(ctx, c.old.Route)
	}
	return p.store.Delete(ctx, c.service)
}

func (p *Proxy) renderLocked(backends map[string]route.Backend) []byte {
	list := make([]route.Backend, 0, len(backends))
	for _, b := range backends {
		list = append(list, b)
	}
	return haproxy.Render(p.settings, list)
}

// restoreTimeout bounds putting KV back after a failed reload.
const restoreTimeout = 10 * time.Second

// commitTimeout bounds applying one batch of changes: Consul reads and writes and the reload.
const commitTimeout = 90 * time.Second

func sortBackends(bs []route.Backend) {
	sort.Slice(bs, func(i, j int) bool { return bs[i].Route.ServiceName < bs[j].Route.ServiceName })
}
