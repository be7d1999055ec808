// Package proxy is the controller: it keeps the route table, turns it with the catalog's instances into
// haproxy.cfg and applies it, and keeps Consul KV, the source of truth, in step. Changes are applied
// one at a time.
package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
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

// instancesOf reads, in one bulk read, the instances of every Consul service the routes use (those
// whose instances the environment lists aside), when the catalog can and more than one service is
// read. Otherwise it returns nothing, and backendOf reads each service on its own.
func (p *Proxy) instancesOf(ctx context.Context, routes []route.Route) (map[string][]route.Instance, error) {
	bc, ok := p.catalog.(bulkCatalog)
	if !ok {
		return nil, nil
	}
	var names []string
	for _, r := range routes {
		if _, fixed := p.staticInstances(r.ServiceName); !fixed {
			names = append(names, r.ConsulServices()...)
		}
	}
	sort.Strings(names)
	names = slices.Compact(names)
	if len(names) < 2 {
		return nil, nil
	}
	m, err := bc.InstancesOf(ctx, names)
	if p.consul(OpReadInstances, err) != nil {
		return nil, fmt.Errorf("load instances of %d services: %w: %w", len(names), ErrConsul, err)
	}
	out := make(map[string][]route.Instance, len(names))
	for _, n := range names {
		out[n] = m[n]
	}
	return out, nil
}

// Store is the route table in Consul KV.
type Store interface {
	// Table reads the whole table; Folders the folders of some routes, at a cost that does not
	// grow with the table.
	Table(ctx context.Context) (route.KVTable, error)
	Folders(ctx context.Context, services []string) (route.KVTable, error)
	// Write puts a route (r != nil) or deletes it in one transaction and returns the version of
	// the folder it left; Restore puts back prev if the folder still holds that version
	// (check-and-set).
	Write(ctx context.Context, service string, r *route.Route) (route.KVVersion, error)
	Restore(ctx context.Context, service string, prev *route.Route, version route.KVVersion) (bool, error)
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

// Observer is told what the controller does, for metrics (*metrics.Metrics is one). It is called
// with the controller's lock held: its methods must not block.
type Observer interface {
	// Reload: HAProxy was reloaded with a new config; err nil once the new worker serves.
	Reload(d time.Duration, err error)
	// RuntimeUpdate: servers were changed through the runtime API, without a reload.
	RuntimeUpdate(err error)
	// Validated: `haproxy -c` ran on a rendered config.
	Validated(err error)
	// Consul: a Consul operation (OpReadRoutes, OpReadInstances, OpWriteRoutes) answered or failed.
	Consul(op string, err error)
	// Table: the route table HAProxy serves now, its routes and instances over all routes.
	Table(routes, instances int)
}

// Consul operations an Observer is told about.
const (
	OpReadRoutes    = "read_routes"
	OpReadInstances = "read_instances"
	OpWriteRoutes   = "write_routes"
)

type noObserver struct{}

func (noObserver) Reload(time.Duration, error) {}
func (noObserver) RuntimeUpdate(error)         {}
func (noObserver) Validated(error)             {}
func (noObserver) Consul(string, error)        {}
func (noObserver) Table(int, int)              {}

// Proxy is the controller. Create it with New; call Load before serving.
type Proxy struct {
	catalog  Catalog
	store    Store
	haproxy  HAProxy
	settings haproxy.Settings
	log      *slog.Logger
	obs      Observer

	served    []byte           // the config of backends, rendered; nil when it must be rendered again
	renderer  haproxy.Renderer // renders whole configs, writing again only what changed since the last
	templates Templates        // nil: routes that name a template are refused
	static    map[string]route.EnvRoute

	mu       sync.Mutex               // held while a batch of changes is applied
	backends map[string]route.Backend // what HAProxy serves now
	// byConsul lists, for each Consul service, the routes of backends that use it (sorted); nil
	// when backends changed since it was built.
	byConsul map[string][]string
	// kv has the version of each folder of KV that the table served stands for: the one this
	// replica wrote or read last. A watch of KV that sees other versions names the folders to read.
	kv map[string]route.KVVersion
	// loadIndex is Consul's index of Load's read of the whole table.
	loadIndex uint64
	// manyChecks: the warning that HAProxy checks many instances a second was logged (it is again
	// once the rate fell below half of ManyChecksPerSecond and rose again).
	manyChecks bool

	qmu   sync.Mutex
	queue []*change // changes waiting for the next commit
}

// New makes a controller with an empty route table.
func New(catalog Catalog, store Store, hap HAProxy, settings haproxy.Settings, logger *slog.Logger) *Proxy {
	if logger == nil {
		logger = slog.Default()
	}
	return &Proxy{catalog: catalog, store: store, haproxy: hap, settings: settings, log: logger,
		obs: noObserver{}, backends: map[string]route.Backend{}, kv: map[string]route.KVVersion{}}
}

// SetObserver makes o observe the controller (nil: nothing does). Call it before Load.
func (p *Proxy) SetObserver(o Observer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if o == nil {
		o = noObserver{}
	}
	p.obs = o
}

// Load rebuilds the whole route table from KV and the catalog and returns the config that serves it.
// The caller starts HAProxy with that config. Routes in KV that are not valid are logged and skipped.
func (p *Proxy) Load(ctx context.Context) ([]byte, error) {
	t0 := time.Now()
	t, err := p.store.Table(ctx)
	if p.consul(OpReadRoutes, err) != nil {
		return nil, fmt.Errorf("load routes: %w: %w", ErrConsul, err)
	}
	routes := p.routesOf(t)
	t1 := time.Now()
	known, err := p.instancesOf(ctx, routes)
	if err != nil {
		return nil, err
	}
	t2 := time.Now()
	backends := make(map[string]route.Backend, len(routes))
	for _, r := range routes {
		be, err := p.backendOf(ctx, r, known)
		var pe *route.ParamError
		if errors.As(err, &pe) {
			p.log.Warn("skipping a route whose templates do not render", "service", r.ServiceName, "error", err)
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("load route %s: %w", r.ServiceName, err)
		}
		backends[r.ServiceName] = be
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.backends, p.served, p.byConsul, p.kv, p.loadIndex = backends, nil, nil, t.Versions, t.Index
	p.observeTableLocked()
	cfg := p.renderLocked(backends)
	p.log.Info("route table loaded from consul", "routes", len(backends), "kv_read", t1.Sub(t0).Round(time.Millisecond),
		"catalog_read", t2.Sub(t1).Round(time.Millisecond), "rendered", time.Since(t2).Round(time.Millisecond))
	return cfg, nil
}

// LoadedKV returns the version of each folder of KV that the table served stands for, and
// Consul's index of the read of the whole table that Load made (0 before Load). A watch of KV
// that starts from them (consul.Watcher.SeedRoutes) reports the table only once it changed after
// that read.
func (p *Proxy) LoadedKV() (map[string]route.KVVersion, uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return maps.Clone(p.kv), p.loadIndex
}

// Apply makes HAProxy serve the current route table (after Load, or to re-apply it).
func (p *Proxy) Apply(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	cfg := p.servedLocked()
	if err := p.timed(func() error { return p.haproxy.Apply(ctx, cfg) }); err != nil {
		return fmt.Errorf("%w: %w", ErrApply, err)
	}
	return nil
}

// Config renders the route table as HAProxy serves it.
func (p *Proxy) Config() []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.servedLocked()
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

// ConsulServices returns the Consul services whose instances the served routes use, in no order.
func (p *Proxy) ConsulServices() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Collect(maps.Keys(p.byConsulLocked()))
}

// Reconfigure adds or replaces a route. It returns once HAProxy serves it, with the instances found.
// On any failure nothing changes: neither KV nor what HAProxy serves.
func (p *Proxy) Reconfigure(ctx context.Context, r route.Route) ([]route.Instance, error) {
	if err := r.Validate(); err != nil {
		return nil, err
	}
	if err := p.refuseStatic(r.ServiceName); err != nil {
		return nil, err
	}
	c := &change{service: r.ServiceName, route: &r, done: make(chan error, 1)}
	if err := p.submit(ctx, c); err != nil {
		return nil, err
	}
	p.log.Info("route configured", "service", r.ServiceName, "consul_services", r.ConsulServices(),
		"paths", r.ServicePath, "domains", r.ServiceDomain, "destinations", len(r.Destinations()),
		"instances", c.backend.InstanceCount())
	return c.backend.Instances, nil
}

// Remove deletes a route from HAProxy and KV. It reports whether the route was served.
func (p *Proxy) Remove(ctx context.Context, serviceName string) (bool, error) {
	if err := route.ValidateServiceName(serviceName); err != nil {
		return false, err
	}
	if err := p.refuseStatic(serviceName); err != nil {
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
	// instancesOnly replaces the instances of one Consul service of a served route
	// (consulService, c.instances), if it is served.
	instancesOnly bool
	consulService string
	// fromKV brings the served table to KV's (force: re-reading every route's instances); it is
	// expanded into subs when its batch is applied.
	fromKV, force bool
	// seen, for a fromKV change without force, has the versions of KV's folders that a watch saw
	// at seenIndex: only the folders whose version differs from the one served are read (nil:
	// the whole table is).
	seen      map[string]route.KVVersion
	seenIndex uint64
	subs      []*change

	instances []route.Instance

	// Filled in while the change is applied: the route with its instances and templates, and the
	// version of KV's folder it wrote or, for an observed change of the table, read.
	backend route.Backend
	version route.KVVersion
	existed bool
	old     route.Backend
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
	p.mu.Lock()
	for _, name := range p.routesUsingLocked(consulService) {
		b := p.backends[name]
		if _, fixed := p.staticInstances(name); fixed {
			continue // its instances are listed in the environment, not followed in the catalog
		}
		// A list equal to the one served (the first report of a watch after Load) changes nothing.
		if !sameInstances(b, consulService, inst) {
			cs = append(cs, &change{service: name, observed: true, instancesOnly: true,
				consulService: consulService, instances: inst, done: make(chan error, 1)})
		}
	}
	p.mu.Unlock()
	if len(cs) == 0 {
		return nil
	}
	return p.submit(ctx, cs...)
}

// routesUsingLocked returns the routes that use a Consul service, sorted. A watch reports every
// service of the table after a start: the index keeps each report from going through the table.
func (p *Proxy) routesUsingLocked(consulService string) []string {
	return p.byConsulLocked()[consulService]
}

// byConsulLocked is the index of the routes by the Consul services they use, built when the table
// changed since.
func (p *Proxy) byConsulLocked() map[string][]string {
	if p.byConsul == nil {
		p.byConsul = indexByConsul(p.backends)
	}
	return p.byConsul
}

// indexByConsul lists, for each Consul service, the routes of backends that use it (sorted).
func indexByConsul(backends map[string]route.Backend) map[string][]string {
	index := map[string][]string{}
	for name, b := range backends {
		for _, svc := range b.Route.ConsulServices() {
			index[svc] = append(index[svc], name)
		}
	}
	for svc, names := range index {
		slices.Sort(names)
		index[svc] = slices.Compact(names)
	}
	return index
}

// reindexLocked brings the index of routes by Consul service up to date with changes just applied,
// in their order (each change's old is the route it replaced), rather than building it again for
// the whole table. Lists are replaced, never changed in place: callers may hold the old ones.
func (p *Proxy) reindexLocked(changes []*change) {
	if p.byConsul == nil {
		return // built when next asked for
	}
	for _, c := range changes {
		if c.instancesOnly {
			continue
		}
		if c.existed {
			for _, svc := range c.old.Route.ConsulServices() {
				names := p.byConsul[svc]
				i, found := slices.BinarySearch(names, c.service)
				switch {
				case !found:
				case len(names) == 1:
					delete(p.byConsul, svc)
				default:
					p.byConsul[svc] = slices.Concat(names[:i], names[i+1:])
				}
			}
		}
		if c.route != nil {
			for _, svc := range c.route.ConsulServices() {
				names := p.byConsul[svc]
				if i, found := slices.BinarySearch(names, c.service); !found {
					p.byConsul[svc] = slices.Concat(names[:i], []string{c.service}, names[i:])
				}
			}
		}
	}
}

// SyncFromKV makes the served routes those of the route table in KV (written by this or another
// replica): new and changed routes are served with their instances read from the catalog, routes
// no longer in KV are removed. The table is read while changes are applied one batch at a time, so it
// is never older than a change this proxy made. Nothing is written to KV.
func (p *Proxy) SyncFromKV(ctx context.Context) error {
	return p.submit(ctx, &change{fromKV: true, observed: true, done: make(chan error, 1)})
}

// SyncFromKVSeen is SyncFromKV for the versions of KV's folders that a watch saw at Consul's index
// index: only the folders whose version differs from the one served are read (in step with the
// controller's own changes, like SyncFromKV), and none when the watch saw this replica's own
// writes. A folder this replica wrote after index is left alone: the watch saw an older state.
func (p *Proxy) SyncFromKVSeen(ctx context.Context, seen map[string]route.KVVersion, index uint64) error {
	if seen == nil {
		seen = map[string]route.KVVersion{}
	}
	return p.submit(ctx, &change{fromKV: true, observed: true, seen: seen, seenIndex: index, done: make(chan error, 1)})
}

// staleLocked returns, sorted, the folders whose version seen at index differs from the one the
// served table stands for, leaving out those this replica wrote after index.
func (p *Proxy) staleLocked(seen map[string]route.KVVersion, index uint64) []string {
	var out []string
	for name, v := range seen {
		if have, ok := p.kv[name]; !ok || have != v && have.Index <= index {
			out = append(out, name)
		}
	}
	for name, have := range p.kv {
		if _, ok := seen[name]; !ok && have.Index <= index {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}

// setKVLocked records the version of a folder that the served table stands for.
func (p *Proxy) setKVLocked(service string, v route.KVVersion) {
	if v == (route.KVVersion{}) {
		delete(p.kv, service)
	} else {
		p.kv[service] = v
	}
}

// Reload makes HAProxy load the route table again (and so the files it names, certificates among
// them). With recreate, the table is first rebuilt from KV and every route's instances are read
// again from the catalog.
func (p *Proxy) Reload(ctx context.Context, recreate bool) error {
	if !recreate {
		p.mu.Lock()
		defer p.mu.Unlock()
		cfg := p.servedLocked()
		r, ok := p.haproxy.(reloader)
		if !ok {
			return p.timed(func() error { return p.haproxy.Apply(ctx, cfg) })
		}
		if err := p.timed(func() error { return r.Reload(ctx, cfg) }); err != nil {
			return fmt.Errorf("%w: %w", ErrApply, err)
		}
		return nil
	}
	return p.submit(ctx, &change{fromKV: true, force: true, observed: true, done: make(chan error, 1)})
}

// maxFolderReads is the number of changed folders above which a watch's news is read as the
// whole table rather than folder by folder.
const maxFolderReads = 256

// expandLocked replaces each fromKV change by the changes that bring the served table to KV's: they
// come first, so that the batch's requests, newer than the table, apply after them.
func (p *Proxy) expandLocked(ctx context.Context, batch []*change) (expanded []*change, parents []*change) {
	var rest []*change
	for _, c := range batch {
		if !c.fromKV {
			rest = append(rest, c)
			continue
		}
		var scope []string // the folders read; nil: the whole table
		if c.seen != nil && !c.force {
			scope = p.staleLocked(c.seen, c.seenIndex)
			if len(scope) == 0 {
				c.done <- nil
				continue
			}
			if len(scope) > maxFolderReads {
				scope = nil
			}
		}
		var t route.KVTable
		var err error
		if scope == nil {
			t, err = p.store.Table(ctx)
		} else {
			t, err = p.store.Folders(ctx, scope)
		}
		if p.consul(OpReadRoutes, err) != nil {
			c.done <- fmt.Errorf("read route table: %w: %w", ErrConsul, err)
			continue
		}
		c.subs = p.fromKVLocked(t, scope, c.force)
		if len(c.subs) == 0 {
			c.done <- nil
			continue
		}
		expanded = append(expanded, c.subs...)
		parents = append(parents, c)
	}
	return append(expanded, rest...), parents
}

// routesOf returns the routes of a table read from KV, with the routes of environment variables,
// and logs the folders that are not valid routes.
func (p *Proxy) routesOf(t route.KVTable) []route.Route {
	for _, e := range t.Invalid {
		p.log.Warn("skipping a route in KV that is not valid", "error", e)
	}
	return p.withStatic(t.Routes)
}

// fromKVLocked returns the changes that bring the served routes of scope (nil: every route) to
// those of t, read from KV, with the routes of environment variables; force changes every route.
// The folders already served as t has them are recorded as in step; the others are when their
// change is applied.
func (p *Proxy) fromKVLocked(t route.KVTable, scope []string, force bool) []*change {
	inKV := make(map[string]route.Route, len(t.Routes))
	for _, r := range p.routesOf(t) {
		inKV[r.ServiceName] = r
	}
	if scope == nil {
		all := map[string]bool{}
		for name := range p.backends {
			all[name] = true
		}
		for name := range p.kv {
			all[name] = true
		}
		for name := range t.Versions {
			all[name] = true
		}
		scope = slices.Sorted(maps.Keys(all))
	}
	var subs []*change
	for _, name := range scope {
		r, ok := inKV[name]
		b, served := p.backends[name]
		v := t.Versions[name]
		switch {
		case ok && (force || !served || !b.Route.Equal(r)):
			subs = append(subs, &change{service: name, route: &r, observed: true, version: v, done: make(chan error, 1)})
		case !ok && served:
			subs = append(subs, &change{service: name, observed: true, version: v, done: make(chan error, 1)})
		default:
			p.setKVLocked(name, v)
		}
	}
	return subs
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
			be, err := route.Backend{}, bulkErr
			if bulkErr == nil {
				be, err = p.backendOf(ctx, *c.route, bulk)
			}
			if err != nil {
				c.done <- err
				continue
			}
			c.backend = be
		}
		ready = append(ready, c)
	}
	if len(ready) == 0 {
		return
	}
	next := p.nextLocked(ready)
	if err := p.checkPortsLocked(next); err != nil {
		if len(ready) > 1 {
			for _, c := range ready {
				p.commitLocked(ctx, []*change{c})
			}
			return
		}
		ready[0].done <- err
		return
	}
	p.refreshTemplatesLocked(ctx, ready, next)
	cfg, err := p.renderCheckedLocked(ctx, next, ready)
	if err != nil {
		if len(ready) > 1 {
			// Find the change that HAProxy rejects: apply them one by one.
			for _, c := range ready {
				p.commitLocked(ctx, []*change{c})
			}
			return
		}
		if verr := p.validate(ctx, p.servedLocked()); verr == nil {
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
		if err := p.consul(OpWriteRoutes, p.write(ctx, c)); err != nil {
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
			if rerr := p.consul(OpWriteRoutes, p.restore(rctx, written[i])); rerr != nil {
				p.log.Error("reload failed and KV could not be restored", "service", written[i].service, "error", err, "restore_error", rerr)
			}
		}
		for _, c := range written {
			c.done <- err
		}
		return
	}
	p.reindexLocked(written)
	p.backends, p.served = next, cfg
	p.observeTableLocked()
	for _, c := range written {
		if !c.instancesOnly {
			p.setKVLocked(c.service, c.version)
		}
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
	p.settings.HasCerts, p.served = hasCerts, nil
}

// RefreshCerts tells the controller whether the certificates folder holds a certificate, and makes
// HAProxy load the folder again (it reads certificates only when it loads its config): the HTTPS
// bind appears with the first certificate, and a new or replaced one is served.
func (p *Proxy) RefreshCerts(ctx context.Context, hasCerts bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	old := p.settings.HasCerts
	p.settings.HasCerts, p.served = hasCerts, nil
	cfg := p.servedLocked()
	var err error
	if r, ok := p.haproxy.(reloader); ok {
		err = p.timed(func() error { return r.Reload(ctx, cfg) })
	} else {
		err = p.timed(func() error { return p.haproxy.Apply(ctx, cfg) })
	}
	if err != nil {
		p.settings.HasCerts, p.served = old, nil
		return fmt.Errorf("%w: %w", ErrApply, err)
	}
	return nil
}

// serverUpdater is an HAProxy that can change the servers of its backends, and add routes to its
// maps, without a reload.
type serverUpdater interface {
	UpdateServers(ctx context.Context, cfg []byte) (haproxy.Delta, error)
}

// applyLocked makes HAProxy serve cfg. When cfg differs from the config of the table served only in
// the servers of existing backends, or in plain routes added to a map, it goes through the runtime
// API (no reload); otherwise, or when that fails, by a validated reload, which also repairs a partly
// done runtime update.
func (p *Proxy) applyLocked(ctx context.Context, cfg []byte) error {
	up, ok := p.haproxy.(serverUpdater)
	if !ok {
		return p.timed(func() error { return p.haproxy.Apply(ctx, cfg) })
	}
	if bytes.Equal(p.servedLocked(), cfg) {
		return p.haproxy.Apply(ctx, cfg) // the same config: no reload, nothing to log
	}
	delta, err := up.UpdateServers(ctx, cfg)
	switch {
	case err == nil:
		p.obs.RuntimeUpdate(nil)
		added, removed := 0, 0
		for _, c := range append(slices.Clone(delta.Servers), delta.Backends...) {
			added += len(c.Add)
			removed += len(c.Remove)
		}
		p.log.Info("haproxy updated", "path", "runtime-api", "backends", len(delta.Servers),
			"servers_added", added, "servers_removed", removed, "routes_added", len(delta.MapAdds))
		return nil
	case errors.Is(err, haproxy.ErrBeyondRuntime):
		// Only a reload serves this change.
	case errors.Is(err, haproxy.ErrNeedsReload):
		// Refused before any change: no spare backend left, no stats socket, HAProxy restarting.
		p.obs.RuntimeUpdate(err)
		p.log.Info("the runtime API cannot serve the change; reloading", "reason", err)
	default:
		p.obs.RuntimeUpdate(err)
		p.log.Warn("changing HAProxy through the runtime API failed; reloading instead", "error", err)
	}
	if err := p.timed(func() error { return p.haproxy.Apply(ctx, cfg) }); err != nil {
		return err
	}
	p.log.Info("haproxy updated", "path", "reload")
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
				b := c.old
				b.SetInstances(c.consulService, c.instances)
				next[c.service] = b
			}
			continue
		}
		if c.route == nil {
			delete(next, c.service)
		} else {
			next[c.service] = c.backend
		}
	}
	return next
}

func (p *Proxy) write(ctx context.Context, c *change) error {
	var err error
	c.version, err = p.store.Write(ctx, c.service, c.route)
	return err
}

// restore puts back in KV what a change replaced, unless another replica wrote the route since.
func (p *Proxy) restore(ctx context.Context, c *change) error {
	var prev *route.Route
	if c.existed {
		prev = &c.old.Route
	}
	restored, err := p.store.Restore(ctx, c.service, prev, c.version)
	// The folder is now as this replica wrote it before, or as another replica wrote it: the
	// next watch report reads it again.
	delete(p.kv, c.service)
	if err == nil && !restored {
		p.log.Info("not restoring a route in KV: another replica wrote it since", "service", c.service)
	}
	return err
}

// servedLocked is the config of the table served, rendered once per change of the table.
func (p *Proxy) servedLocked() []byte {
	if p.served == nil {
		p.served = p.renderLocked(p.backends)
	}
	return p.served
}

// checkPartLocked is the config that `haproxy -c` checks before a batch is applied: the routes the
// batch changes, rendered alone with the proxy-wide sections. The other routes passed the check
// when they were applied, and routes share nothing in haproxy.cfg but names the renderer keeps
// apart (and source ports, which checkPortsLocked compares), so this stands for the whole config at
// a cost that does not grow with the table. When a route has a custom template, which may refer
// to other routes' backends, the whole config must be checked: it returns nil. The reload checks
// the whole config too: a config it refuses is never served.
func (p *Proxy) checkPartLocked(next map[string]route.Backend, batch []*change) []byte {
	subset := map[string]route.Backend{}
	for _, b := range next {
		if b.FrontendSnippet != "" || b.BackendSnippet != "" {
			return nil
		}
	}
	for _, c := range batch {
		if b, ok := next[c.service]; ok {
			subset[c.service] = b
		}
	}
	// Rendered alone: through the Renderer, it would forget the other routes' text.
	return haproxy.Render(p.settings, slices.Collect(maps.Values(subset)))
}

func (p *Proxy) renderLocked(backends map[string]route.Backend) []byte {
	// Through the Renderer, which writes again only the backends that changed and, when no route
	// did, keeps the frontend and the maps: at 10,000 routes a change of instances renders in some
	// 3 ms, a new route in 16, where the whole config takes 32. It keeps the order of names too.
	return p.renderer.RenderTable(p.settings, backends)
}

// timed runs a reload of HAProxy and tells the observer how it went and how long it took.
func (p *Proxy) timed(reload func() error) error {
	start := time.Now()
	err := reload()
	p.obs.Reload(time.Since(start), err)
	return err
}

// validate runs `haproxy -c` on cfg and tells the observer.
func (p *Proxy) validate(ctx context.Context, cfg []byte) error {
	err := p.haproxy.Validate(ctx, cfg)
	p.obs.Validated(err)
	return err
}

// voucher is an HAProxy that takes a check of part of a config (checkPartLocked) for a check of the
// whole, which it then applies without checking it again.
type voucher interface {
	Vouch(whole []byte)
}

// renderCheckedLocked renders the config of next and checks it with `haproxy -c`: the part the
// batch changes, while the whole config renders, when HAProxy takes that check for the whole;
// otherwise the whole config, once rendered.
func (p *Proxy) renderCheckedLocked(ctx context.Context, next map[string]route.Backend, batch []*change) ([]byte, error) {
	v, ok := p.haproxy.(voucher)
	part := p.checkPartLocked(next, batch)
	if !ok || part == nil {
		cfg := p.renderLocked(next)
		return cfg, p.validate(ctx, cfg)
	}
	// The render is pure computation on next, which nothing else touches meanwhile.
	rendered := make(chan []byte, 1)
	go func() { rendered <- p.renderLocked(next) }()
	err := p.haproxy.Validate(ctx, part)
	cfg := <-rendered
	p.obs.Validated(err)
	if err == nil {
		v.Vouch(cfg)
	}
	return cfg, err
}

// consul tells the observer how a Consul operation went and returns its error.
func (p *Proxy) consul(op string, err error) error {
	p.obs.Consul(op, err)
	return err
}

// observeTableLocked tells the observer the route table served, and warns once when HAProxy's
// health checks of it take many connections a second.
func (p *Proxy) observeTableLocked() {
	n := 0
	for _, b := range p.backends {
		n += b.InstanceCount()
	}
	p.obs.Table(len(p.backends), n)

	checked := haproxy.CheckedInstances(maps.Values(p.backends))

	interval := p.settings.CheckInterval
	if interval <= 0 {
		interval = haproxy.AutoCheckInterval(checked) // which keeps the rate at ManyChecksPerSecond at most
	}
	rate := float64(checked) / interval.Seconds()
	switch {
	case rate > ManyChecksPerSecond && !p.manyChecks:
		p.manyChecks = true
		p.log.Warn("HAProxy health-checks many instances: each check is a connection to the instance, and a share of the proxy's CPU",
			"checked_instances", checked, "interval", interval, "checks_per_second", int(rate),
			"hint", "set a longer --check-interval (CHECK_INTERVAL), or 0 for one that grows with the instances, or route services with skipCheck=true where Consul's checks suffice")
	case rate < ManyChecksPerSecond/2:
		p.manyChecks = false
	}
}

// ManyChecksPerSecond is the rate of HAProxy's health checks above which the controller warns (an
// interval set by hand; the automatic one stays below it): on two cores, 7,500 checks a second
// took HAProxy a quarter of one.
const ManyChecksPerSecond = haproxy.MaxAutoChecksPerSecond

// restoreTimeout bounds putting KV back after a failed reload.
const restoreTimeout = 10 * time.Second

// commitTimeout bounds applying one batch of changes: Consul reads and writes and the reload.
const commitTimeout = 90 * time.Second

func sortBackends(bs []route.Backend) {
	sort.Slice(bs, func(i, j int) bool { return bs[i].Route.ServiceName < bs[j].Route.ServiceName })
}
