package consul

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// catalogWatch is the Watcher's view of the catalog (see catalogread.go for the design). Every
// field but kick is guarded by Watcher.mu.
type catalogWatch struct {
	kick chan struct{} // capacity 1: the view or the followed services changed

	nodesW  *watch            // on the node list
	checksW *watch            // on every check
	nodeWs  map[string]*watch // on the services of each node, while they are few
	// pooled: the nodes are more than the limit of node watches, and one watch (pool) follows the
	// services of every node (see startPoolLocked); poke makes it read every node again at once.
	pooled bool
	pool   *watch
	poke   context.CancelFunc // ends the pool's blocking query; nil while it does not block
	poked  bool               // the pool is to read every node again without blocking

	nodesKnown  bool
	nodes       map[string]*nodeView // the nodes listed; nil until the node's services are read
	checksKnown bool
	checks      []checkState
	checksIndex uint64

	// needChecks: services were added or changed at this index, the checks must be read at an
	// index at least as high (0: nothing needed). needNodes: checks of these nodes vanished at
	// this index, their services must be read at an index at least as high.
	needChecks uint64
	needNodes  map[string]uint64

	emitted map[string][]route.Instance // the list last reported, per followed service
	raw     map[string]string           // the fingerprint it was computed from
	// dirty names the services whose entries may have changed since the last computation: the
	// services of a node whose address, services or checks changed, and services newly followed.
	// A computation goes through these only, not through every service followed.
	dirty map[string]bool
}

type nodeView struct {
	nodeServices
	index uint64
}

// catalogRounds bounds the fresh reads made for one computation (see refresh).
const catalogRounds = 3

func newCatalogWatch() catalogWatch {
	return catalogWatch{
		kick:      make(chan struct{}, 1),
		nodeWs:    map[string]*watch{},
		nodes:     map[string]*nodeView{},
		needNodes: map[string]uint64{},
		emitted:   map[string][]route.Instance{},
		raw:       map[string]string{},
		dirty:     map[string]bool{},
	}
}

// signal asks for a computation.
func (cw *catalogWatch) signal() {
	select {
	case cw.kick <- struct{}{}:
	default:
	}
}

// markNode marks the services of a node whose services are now ns: every one when the node's
// address changed (or it was not read before, or is gone: ns nil), otherwise those added, changed
// or removed.
func (cw *catalogWatch) markNode(old *nodeView, ns *nodeServices) {
	switch {
	case old == nil && ns == nil:
	case old == nil:
		cw.markAll(ns.services)
	case ns == nil || old.address != ns.address:
		cw.markAll(old.services)
		if ns != nil {
			cw.markAll(ns.services)
		}
	default:
		// Both lists are sorted by ID: a merge finds the differences.
		a, b := old.services, ns.services
		for len(a) > 0 || len(b) > 0 {
			switch {
			case len(b) == 0 || len(a) > 0 && a[0].ID < b[0].ID:
				cw.dirty[a[0].Name] = true
				a = a[1:]
			case len(a) == 0 || b[0].ID < a[0].ID:
				cw.dirty[b[0].Name] = true
				b = b[1:]
			default:
				if a[0] != b[0] {
					cw.dirty[a[0].Name], cw.dirty[b[0].Name] = true, true
				}
				a, b = a[1:], b[1:]
			}
		}
	}
}

func (cw *catalogWatch) markAll(services []serviceState) {
	for _, s := range services {
		cw.dirty[s.Name] = true
	}
}

// markCheck marks the services a check applies to: every service of its node for a node check,
// else its own service. A node not read yet marks its services when it is.
func (cw *catalogWatch) markCheck(c checkState) {
	v := cw.nodes[c.Node]
	if v == nil {
		return
	}
	if c.ServiceID == "" {
		cw.markAll(v.services)
		return
	}
	if i, ok := slices.BinarySearchFunc(v.services, c.ServiceID, func(s serviceState, id string) int {
		return strings.Compare(s.ID, id)
	}); ok {
		cw.dirty[v.services[i].Name] = true
	}
}

// forget drops what was reported of a service that is no longer followed.
func (cw *catalogWatch) forget(service string) {
	delete(cw.emitted, service)
	delete(cw.raw, service)
}

func (cw *catalogWatch) ready() bool {
	if !cw.nodesKnown || !cw.checksKnown {
		return false
	}
	for _, v := range cw.nodes {
		if v == nil {
			return false
		}
	}
	return true
}

// catalogQuery adapts Watcher.query to the readers of catalogread.go.
func (w *Watcher) catalogQuery(index uint64, wait time.Duration) func(ctx context.Context, call func(a *api.Client, q *api.QueryOptions) (*api.QueryMeta, error)) (uint64, error) {
	return func(ctx context.Context, call func(a *api.Client, q *api.QueryOptions) (*api.QueryMeta, error)) (uint64, error) {
		return w.query(ctx, index, wait, call)
	}
}

// startCatalogLocked starts the watches of the node list and of the checks, and the goroutine
// that computes the instances. With a seed (SeedCatalog), the view starts as the seed read the
// catalog, and every watch, those of the seed's nodes too, blocks from the index of its read in
// the seed. w.mu is held and Run runs.
func (w *Watcher) startCatalogLocked() {
	cw := &w.cat
	nodes := source[nodeList]{
		fetch: func(ctx context.Context, index uint64, wait time.Duration) (nodeList, uint64, error) {
			return w.c.readNodeList(ctx, w.catalogQuery(index, wait))
		},
		same:    sameNodeList,
		deliver: w.deliverNodes,
	}
	checks := source[[]checkState]{
		fetch: func(ctx context.Context, index uint64, wait time.Duration) ([]checkState, uint64, error) {
			return readChecks(ctx, w.catalogQuery(index, wait))
		},
		same:    slices.Equal[[]checkState],
		deliver: w.deliverChecks,
	}
	if seed := w.catalogSeed; seed != nil {
		w.catalogSeed = nil
		snap := seed.snap
		names := slices.Sorted(maps.Keys(snap.nodes))
		// In the order of the reads: the rules of catalogread.go hold for the seed as for reads.
		for _, n := range names {
			w.applyNodeLocked(n, snap.nodes[n], snap.nodeIndex[n])
		}
		w.applyChecksLocked(snap.checks, snap.checksIndex)
		// The seed's checks were read after its services (readCatalog), whatever their index
		// (each of Consul's tables has its own).
		cw.needChecks = 0
		cw.nodesKnown = true
		if len(names) > w.nodeWatchLimit {
			// The pool blocks from the lowest index of the seed's reads: a change made while the
			// seed read the nodes wakes it at once.
			var from uint64
			for i, n := range names {
				if idx := snap.nodeIndex[n]; i == 0 || idx < from {
					from = idx
				}
			}
			w.logger.Info("consul watch: more nodes than node watches; one watch follows them all", "nodes", len(names), "node_watch_limit", w.nodeWatchLimit)
			w.startPoolLocked(snap.nodes, from)
		} else {
			for _, n := range names {
				w.startNodeLocked(n, cw.nodes[n])
			}
		}
		list := nodeList{names: names, addresses: make([]string, len(names))}
		for i, n := range names {
			list.addresses[i] = snap.nodes[n].address
		}
		nodes.seed, nodes.seedIndex = &list, snap.nodesIndex
		checks.seed, checks.seedIndex = &snap.checks, snap.checksIndex
	}
	cw.nodesW = w.startLocked(updateKey{kind: kindCatalog, service: "nodes"}, "catalog nodes",
		func(ctx context.Context, wt *watch) { follow(ctx, w, wt, nodes) })
	cw.checksW = w.startLocked(updateKey{kind: kindCatalog, service: "checks"}, "health checks",
		func(ctx context.Context, wt *watch) { follow(ctx, w, wt, checks) })
	runCtx := w.runCtx
	w.wg.Go(func() { w.computeLoop(runCtx) })
	cw.signal()
}

// stopCatalogLocked stops every watch of the catalog. w.mu is held.
func (w *Watcher) stopCatalogLocked() {
	cw := &w.cat
	for _, wt := range []*watch{cw.nodesW, cw.checksW} {
		if wt != nil {
			w.stopLocked(wt)
		}
	}
	cw.nodesW, cw.checksW = nil, nil
	for n, wt := range cw.nodeWs {
		w.stopLocked(wt)
		delete(cw.nodeWs, n)
	}
	if cw.pool != nil {
		w.stopLocked(cw.pool)
	}
	cw.pool, cw.pooled, cw.poke, cw.poked = nil, false, nil, false
}

// deliverNodes records the node list: it starts following new nodes and stops following those
// gone. A node's own watch sees its address change; the pool is poked for it.
func (w *Watcher) deliverNodes(wt *watch, list nodeList, _ uint64, _ bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if wt.stopped {
		return
	}
	cw := &w.cat
	cw.nodesKnown = true
	listed := make(map[string]bool, len(list.names))
	changed := false // nodes were added, or an address changed
	for i, n := range list.names {
		listed[n] = true
		v, ok := cw.nodes[n]
		if !ok {
			cw.nodes[n] = nil
		}
		changed = changed || !ok || v != nil && v.address != list.addresses[i]
	}
	for n, v := range cw.nodes {
		if !listed[n] {
			if nw := cw.nodeWs[n]; nw != nil {
				w.stopLocked(nw)
				delete(cw.nodeWs, n)
			}
			cw.markNode(v, nil)
			delete(cw.nodes, n)
			delete(cw.needNodes, n)
		}
	}
	w.arrangeNodeWatchesLocked(changed)
	cw.signal()
}

// nodeWatchHysteresis: pooled nodes go back to a watch each once they are at most this fraction
// of the limit, so that a node count around the limit does not switch at every change.
const nodeWatchHysteresis = 0.75

// arrangeNodeWatchesLocked follows the services of every node of cw.nodes: with a watch per node
// while they are at most the limit, else with the pool; changed says that nodes were added or
// their address changed. A node whose view is kept across a switch is read again by its new
// watch. w.mu is held.
func (w *Watcher) arrangeNodeWatchesLocked(changed bool) {
	cw := &w.cat
	n := len(cw.nodes)
	switch {
	case !cw.pooled && n > w.nodeWatchLimit:
		for node, nw := range cw.nodeWs {
			w.stopLocked(nw)
			delete(cw.nodeWs, node)
		}
		w.logger.Info("consul watch: more nodes than node watches; one watch follows them all", "nodes", n, "node_watch_limit", w.nodeWatchLimit)
		w.startPoolLocked(nil, 0)
	case cw.pooled && float64(n) <= nodeWatchHysteresis*float64(w.nodeWatchLimit):
		w.stopLocked(cw.pool)
		cw.pool, cw.pooled, cw.poke, cw.poked = nil, false, nil, false
		w.logger.Info("consul watch: few nodes again; a watch per node", "nodes", n, "node_watch_limit", w.nodeWatchLimit)
		for node := range cw.nodes {
			w.startNodeLocked(node, nil)
		}
	case cw.pooled:
		if changed {
			// The pool reads the nodes now, not at the next change of a service.
			cw.poked = true
			if cw.poke != nil {
				cw.poke()
			}
		}
	default:
		for node := range cw.nodes {
			if cw.nodeWs[node] == nil {
				w.startNodeLocked(node, nil)
			}
		}
	}
}

// poolRead is what the pool read: the services of every node, and the index of each node's read.
type poolRead struct {
	nodes   map[string]nodeServices
	indexes map[string]uint64
}

func samePoolRead(a, b poolRead) bool {
	return maps.EqualFunc(a.nodes, b.nodes, sameNodeServices)
}

// startPoolLocked starts the pool: one watch that follows the services of every node, for a
// catalog of more nodes than the limit of node watches (each is a blocking query, and so a
// connection that Consul counts against its limit per client, 200 by default). It blocks on the
// list of service names (/v1/catalog/services, whose index moves with every change of a service on
// any node; the answer itself is not decoded) and, once it moved, reads the services of every node
// again, bulkReadWorkers at a time; a poke (new nodes) makes it read them at once. A change on one
// node thus costs a read of every node: the price of a constant number of connections. With seed,
// the view starts as the seed (a read of every node, already recorded) and the pool blocks from
// seedIndex. w.mu is held.
func (w *Watcher) startPoolLocked(seed map[string]nodeServices, seedIndex uint64) {
	cw := &w.cat
	var self *watch // set below, under w.mu, before the watch can read it
	body := &bytes.Buffer{}
	services := func(ctx context.Context, index uint64, wait time.Duration) (uint64, error) {
		return w.query(ctx, index, wait, func(a *api.Client, q *api.QueryOptions) (*api.QueryMeta, error) {
			body.Reset()
			_, meta, err := a.Catalog().Services(q.WithContext(withBodySink(q.Context(), body)))
			return meta, err
		})
	}
	src := source[poolRead]{
		fetch: func(ctx context.Context, index uint64, wait time.Duration) (poolRead, uint64, error) {
			next, err := w.poolWait(ctx, &self, index, wait, services)
			if err != nil {
				return poolRead{}, 0, fmt.Errorf("consul catalog services: %w", err)
			}
			w.mu.Lock()
			names := slices.Sorted(maps.Keys(cw.nodes))
			w.mu.Unlock()
			nodes, indexes, err := w.c.readAllNodeServices(ctx, names)
			if err != nil {
				return poolRead{}, 0, err
			}
			return poolRead{nodes: nodes, indexes: indexes}, next, nil
		},
		same: samePoolRead,
		deliver: func(wt *watch, r poolRead, _ uint64, reset bool) {
			w.mu.Lock()
			defer w.mu.Unlock()
			if wt.stopped {
				return
			}
			for n, ns := range r.nodes {
				old, listed := cw.nodes[n]
				if !listed {
					continue // gone since
				}
				index := r.indexes[n]
				if old != nil && !reset && index < old.index {
					continue // older than a fresh read already recorded
				}
				w.applyNodeLocked(n, ns, index)
			}
			cw.signal()
		},
	}
	if seed != nil {
		src.seed, src.seedIndex = &poolRead{nodes: seed}, seedIndex
	}
	cw.pooled = true
	self = w.startLocked(updateKey{kind: kindCatalog, service: "nodes pool"}, "node-services pool",
		func(ctx context.Context, wt *watch) { follow(ctx, w, wt, src) })
	cw.pool = self
}

// poolWait is the pool's wait for a change: query blocks from index until a service changes (from
// 0 it answers at once) or the pool is poked, which ends the query. It returns the index to block
// from next: Consul's, or index again when poked. The pool is *self (read under w.mu, as it is
// written); when it is not the running one any more, its context is ended.
func (w *Watcher) poolWait(ctx context.Context, self **watch, index uint64, wait time.Duration,
	query func(ctx context.Context, index uint64, wait time.Duration) (uint64, error)) (uint64, error) {
	cw := &w.cat
	for {
		pctx, poke := context.WithCancel(ctx)
		w.mu.Lock()
		if cw.pool != *self {
			w.mu.Unlock()
			poke()
			return 0, context.Canceled
		}
		if cw.poked && index > 0 {
			cw.poked = false
			w.mu.Unlock()
			poke()
			return index, nil
		}
		cw.poked, cw.poke = false, poke // a read from 0 reads every node anyway
		w.mu.Unlock()
		next, err := query(pctx, index, wait)
		poked := pctx.Err() != nil && ctx.Err() == nil
		poke()
		w.mu.Lock()
		if cw.pool == *self {
			cw.poke = nil
			if poked {
				cw.poked = false // the nodes are read next, the new ones with them
			}
		}
		w.mu.Unlock()
		switch {
		case err == nil:
			return next, nil
		case !poked:
			return 0, err
		case index > 0:
			return index, nil
		}
		// A read from scratch was poked: it is sent again.
	}
}

// startNodeLocked starts the watch of the services of a node; from a view of them already
// recorded when seed is set. w.mu is held.
func (w *Watcher) startNodeLocked(node string, seed *nodeView) {
	src := source[nodeServices]{
		fetch: func(ctx context.Context, index uint64, wait time.Duration) (nodeServices, uint64, error) {
			return readNodeServices(ctx, node, w.catalogQuery(index, wait))
		},
		same: sameNodeServices,
		deliver: func(wt *watch, ns nodeServices, index uint64, reset bool) {
			w.deliverNode(wt, node, ns, index, reset)
		},
	}
	if seed != nil {
		src.seed, src.seedIndex = &seed.nodeServices, seed.index
	}
	w.cat.nodeWs[node] = w.startLocked(updateKey{kind: kindCatalog, service: "node " + node}, "node-services "+node,
		func(ctx context.Context, wt *watch) { follow(ctx, w, wt, src) })
}

// deliverNode records the services of a node, read by its watch.
func (w *Watcher) deliverNode(wt *watch, node string, ns nodeServices, index uint64, reset bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if wt.stopped {
		return
	}
	if old := w.cat.nodes[node]; old != nil && !reset && index < old.index {
		return // older than a fresh read already recorded
	}
	w.applyNodeLocked(node, ns, index)
	w.cat.signal()
}

// applyNodeLocked records the services of a node read at index.
func (w *Watcher) applyNodeLocked(node string, ns nodeServices, index uint64) {
	cw := &w.cat
	old := cw.nodes[node]
	if addsServices(old, ns) {
		cw.needChecks = max(cw.needChecks, index)
	}
	cw.markNode(old, &ns)
	cw.nodes[node] = &nodeView{nodeServices: ns, index: index}
	if need, ok := cw.needNodes[node]; ok && index >= need {
		delete(cw.needNodes, node)
	}
}

// addsServices reports whether ns holds an instance that old does not hold as it is.
func addsServices(old *nodeView, ns nodeServices) bool {
	if old == nil {
		return len(ns.services) > 0
	}
	if old.address != ns.address {
		return true
	}
	known := make(map[serviceState]bool, len(old.services))
	for _, s := range old.services {
		known[s] = true
	}
	for _, s := range ns.services {
		if !known[s] {
			return true
		}
	}
	return false
}

// deliverChecks records every check, read by the checks' watch.
func (w *Watcher) deliverChecks(wt *watch, cs []checkState, index uint64, reset bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if wt.stopped {
		return
	}
	if w.cat.checksKnown && !reset && index < w.cat.checksIndex {
		return // older than a fresh read already recorded
	}
	w.applyChecksLocked(cs, index)
	w.cat.signal()
}

// applyChecksLocked records every check read at index; the nodes some checks of which vanished
// need their services read at an index at least as high.
func (w *Watcher) applyChecksLocked(cs []checkState, index uint64) {
	cw := &w.cat
	type key struct{ node, id string }
	now := make(map[key]checkState, len(cs))
	for _, c := range cs {
		now[key{c.Node, c.CheckID}] = c
	}
	for _, c := range cw.checks {
		k := key{c.Node, c.CheckID}
		if n, ok := now[k]; ok {
			if n != c {
				cw.markCheck(c)
				cw.markCheck(n)
			}
			delete(now, k) // what is left is new
			continue
		}
		cw.markCheck(c)
		if v := cw.nodes[c.Node]; v != nil && v.index < index {
			cw.needNodes[c.Node] = max(cw.needNodes[c.Node], index)
		}
	}
	for _, c := range now {
		cw.markCheck(c)
	}
	cw.checks, cw.checksIndex, cw.checksKnown = cs, index, true
	if index >= cw.needChecks {
		cw.needChecks = 0
	}
}

// computeLoop computes the instances of the followed services whenever the view changes, until
// ctx ends. Changes that come while it computes are computed together next.
func (w *Watcher) computeLoop(ctx context.Context) {
	for {
		select {
		case <-w.cat.kick:
		case <-ctx.Done():
			return
		}
		if !w.refresh(ctx) {
			// A fresh read failed: the watches see the outage; try again soon.
			if !pause(ctx, w.timing.backoffMin, nil) {
				return
			}
			w.cat.signal()
			continue
		}
		w.mu.Lock()
		w.computeLocked()
		w.mu.Unlock()
	}
}

// refresh makes the reads that the consistency rules ask for (see catalogread.go): the checks when
// services were seen that are newer than them, the services of the nodes some checks of which
// vanished. A read sent now sees a state at least as new as the one the rule waits for. It
// returns false when a read failed.
func (w *Watcher) refresh(ctx context.Context) bool {
	for range catalogRounds {
		w.mu.Lock()
		cw := &w.cat
		if !cw.ready() {
			w.mu.Unlock()
			return true
		}
		needChecks := cw.needChecks > cw.checksIndex
		var nodes []string
		for n, need := range cw.needNodes {
			if v := cw.nodes[n]; v != nil && v.index < need {
				nodes = append(nodes, n)
			} else {
				delete(cw.needNodes, n)
			}
		}
		w.mu.Unlock()
		if !needChecks && len(nodes) == 0 {
			return true
		}
		sort.Strings(nodes)
		if needChecks {
			cs, index, err := readChecks(ctx, w.c.once)
			if err != nil {
				w.logger.Debug("consul watch: reading the checks again failed", "error", err)
				return false
			}
			w.mu.Lock()
			if index >= cw.checksIndex {
				w.applyChecksLocked(cs, index)
			}
			cw.needChecks = 0 // this read was sent after the services were read
			w.mu.Unlock()
		}
		for _, n := range nodes {
			ns, index, err := readNodeServices(ctx, n, w.c.once)
			if err != nil {
				w.logger.Debug("consul watch: reading the services of a node again failed", "node", n, "error", err)
				return false
			}
			w.mu.Lock()
			if v := cw.nodes[n]; v != nil && index >= v.index {
				w.applyNodeLocked(n, ns, index)
			}
			delete(cw.needNodes, n) // this read was sent after the checks vanished
			w.mu.Unlock()
		}
	}
	return true
}

// computeLocked reports each followed service whose instance list differs from the one reported
// last (or that was never reported). w.mu is held.
func (w *Watcher) computeLocked() {
	cw := &w.cat
	if !cw.ready() {
		return
	}
	want := make(map[string]bool, len(cw.dirty))
	for s := range cw.dirty {
		if w.services[s] {
			want[s] = true
		}
	}
	clear(cw.dirty)
	if len(want) == 0 {
		return
	}
	snap := catalogSnapshot{nodes: make(map[string]nodeServices, len(cw.nodes)), checks: cw.checks}
	for n, v := range cw.nodes {
		snap.nodes[n] = v.nodeServices
	}
	entries := snap.entries(want)
	for _, s := range slices.Sorted(maps.Keys(want)) {
		fp := fingerprint(w.filter, entries[s])
		if raw, ok := cw.raw[s]; ok && raw == fp {
			continue
		}
		cw.raw[s] = fp
		inst := w.c.instancesFrom(s, w.filter, entries[s])
		if prev, ok := cw.emitted[s]; ok && slices.Equal(prev, inst) {
			continue
		}
		cw.emitted[s] = inst
		w.enqueueLocked(updateKey{kind: kindService, service: s}, Update{Service: s, Instances: inst})
	}
}
