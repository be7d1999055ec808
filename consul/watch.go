package consul

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// The watcher's pace.
const (
	// watchWait is how long one blocking query waits for a change before Consul answers anyway
	// (it adds up to 1/16 of it as jitter). Consul's default is 5 minutes; a shorter wait costs a
	// query per watch and minute, and bounds how long the queries of a replica that stopped hold
	// their connections: Consul ends a blocking query at its wait even when its client is gone,
	// and counts its connection against its limit per client address (200) until then.
	watchWait = time.Minute
	// watchSeedWait is the wait of a seeded watch's first query. A seed's index above Consul's
	// (an agent that lost its data between the load and the watch's start, as a dev agent does
	// when restarted) would hold that query for the whole wait; Consul answers it after this one
	// with its lower index, and the watch starts over from what Consul holds.
	watchSeedWait = 30 * time.Second
	// watchMinDelay separates two queries of one watch when the index did not move forward, so
	// that an index that stays put or goes backwards never makes a hot loop.
	watchMinDelay = 50 * time.Millisecond
	// A failed read is retried after watchBackoffMin, doubling up to watchBackoffMax; a success
	// resets it. The cap bounds how late the proxy learns of Consul's return (a few watches
	// retrying every second cost Consul nothing).
	watchBackoffMin = 250 * time.Millisecond
	watchBackoffMax = time.Second
	// watchRetryTimeout bounds the attempts of a read after a failure (growing slowly while
	// attempts time out). A Consul that is starting accepts
	// connections before it serves them: a read sent then may hang until the request timeout, long
	// after Consul answers the next one.
	watchRetryTimeout = time.Second
	// updatesBuffer is the capacity of the Updates channel.
	updatesBuffer = 16
)

// Update is one change seen by a Watcher. It is exactly one of: the instances of a service
// (Instances non-nil), the route table (RoutesChanged), an outage (Err), or the end of an
// outage (Recovered).
type Update struct {
	// Instances, when non-nil, is the new instance list of Service, as Client.Instances returns it:
	// filtered, validated, sorted. A service without instances has an empty, non-nil list.
	Service   string
	Instances []route.Instance
	// Versions, when RoutesChanged, has the version of every folder of the route table in KV
	// (Store.Table's), at Consul's index Index: the highest of the prefix's keys and deletions.
	// A writer whose write has an index above Index knows the snapshot to be older than its write.
	// The routes themselves are not read: the news tells which folders changed since.
	RoutesChanged bool
	Versions      map[string]route.KVVersion
	Index         uint64
	// Err, when set, says Consul could not be read (the watcher keeps retrying, and keeps what it
	// knew); Since is when the outage began. A watch that reads Consul again reports its state
	// (the route table even unchanged, every service whose instances differ from the list
	// reported last), followed by the outage again while other watches still fail; once no watch
	// fails any more, an update with Recovered closes the outage.
	Err   error
	Since time.Time
	// Recovered says that every watch reads Consul again after an outage was reported.
	Recovered bool
}

// watchTiming is the watcher's pace; tests shorten it.
type watchTiming struct {
	wait         time.Duration // of a blocking query
	seedWait     time.Duration // of a seeded watch's first query (see watchSeedWait)
	minDelay     time.Duration // between two queries of one watch whose index did not move forward
	backoffMin   time.Duration // after a failure, doubling up to backoffMax
	backoffMax   time.Duration
	retryTimeout time.Duration // of the first attempt after a failure (see watchRetryTimeout)
}

// Watcher follows, with blocking queries, the instances of a set of services and the route table's
// KV prefix, and reports their changes on Updates. It never gives up: a failed read is retried with
// backoff and reported as an outage, and what it knew is kept; when Consul answers again it reports
// the current state. Queries go through the Client, so they fail over between its agents.
//
// The instances come from a watch of the whole catalog (catalogwatch.go) whose number of blocking
// queries does not depend on the number of services followed: one on the node list, one per node
// on its services, one on every health check. A service is reported when its instance list
// differs from the one reported last.
//
// Updates are sent by one goroutine from a queue that keeps only the latest state of each service
// and of the route table: a slow consumer delays updates but loses none, and never blocks the
// watches.
type Watcher struct {
	c      *Client
	store  *Store
	filter HealthFilter
	logger *slog.Logger
	timing watchTiming
	// nodeWatchLimit is the number of nodes above which one watch follows the services of every
	// node rather than a watch each (see startPoolLocked).
	nodeWatchLimit int

	updates chan Update
	notify  chan struct{} // capacity 1: the queue has something for the sender

	mu       sync.Mutex
	ran      bool
	runCtx   context.Context // while Run runs; nil otherwise
	wg       sync.WaitGroup  // the goroutines that Run starts
	services map[string]bool // the services to follow, as Services set them
	cat      catalogWatch    // the watch of the catalog
	routes   *watch          // the running watch of the route table
	pending  map[updateKey]Update
	order    []updateKey // of pending, least recently queued first

	// The outage: the watches whose last read failed, with its error, since when one has been
	// failing, and a channel closed (and replaced) whenever a failed watch reads again, which wakes
	// the watches waiting to retry.
	failing map[*watch]error
	since   time.Time
	wake    chan struct{}

	// What the watches start from (SeedRoutes, SeedCatalog), taken when Run starts them.
	routesSeed  *routesSeed
	catalogSeed *CatalogRead
}

type routesSeed struct {
	versions map[string]route.KVVersion
	index    uint64
}

// DefaultNodeWatchLimit is the number of Consul nodes up to which each node's services are
// followed by a blocking query of their own: the watcher then holds about five connections to its
// agent plus one per node, well under Consul's default limit of 200 per client address (which
// also counts, for up to a query's wait, the queries of a replica that has just stopped).
const DefaultNodeWatchLimit = 64

// SetNodeWatchLimit sets the number of nodes above which one watch follows every node's services
// (0: whatever their number); it is called before Run.
func (w *Watcher) SetNodeWatchLimit(n int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.nodeWatchLimit = max(0, n)
}

// errSeedAfterRun: a watch is seeded once Run has started it.
var errSeedAfterRun = errors.New("consul watch: seeded after Run")

// SeedRoutes makes the watch of the route table start from the versions of its folders that a
// read of the whole table saw at Consul's index (route.KVTable's Versions and Index), the read
// whose table the consumer applied: the watch does not read the table again, and reports it
// only once it changed after that read. Call it before Run.
func (w *Watcher) SeedRoutes(versions map[string]route.KVVersion, index uint64) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ran {
		return errSeedAfterRun
	}
	if versions == nil {
		versions = map[string]route.KVVersion{}
	}
	w.routesSeed = &routesSeed{versions: maps.Clone(versions), index: index}
	return nil
}

// SeedCatalog makes the watch of the catalog start from read, a read of the whole catalog, rather
// than read it again, and records that the consumer has, for each service of reported, that
// list of instances: the service is followed (as Services would add it), and reported only once
// the list computed from the catalog differs from this one. Invalid names are skipped. Call it
// before Run, and Services after it or not at all: Services reports a service it adds.
func (w *Watcher) SeedCatalog(read *CatalogRead, reported map[string][]route.Instance) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ran {
		return errSeedAfterRun
	}
	w.catalogSeed = read
	for name, inst := range reported {
		if checkServiceName(name) != nil {
			continue
		}
		w.services[name] = true
		w.cat.dirty[name] = true
		w.cat.emitted[name] = slices.Clone(inst)
		delete(w.cat.raw, name)
	}
	return nil
}

// updateKey names what an update is about: one service, the route table, or the outage.
type updateKey struct {
	kind    updateKind
	service string
}

type updateKind int

const (
	kindService updateKind = iota
	kindRoutes
	kindOutage
	kindCatalog // a watch of the catalog: it never reports by itself
)

// watch is one running blocking-query loop.
type watch struct {
	key     updateKey
	name    string // for logs
	cancel  context.CancelFunc
	stopped bool // guarded by Watcher.mu: nothing it reads from now on is reported
}

// NewWatcher returns a watcher of the instances (under filter) of the services that Services
// names, and of the route table of store (nil: no route table). A nil logger is the client's.
func NewWatcher(c *Client, store *Store, filter HealthFilter, logger *slog.Logger) *Watcher {
	if logger == nil {
		logger = c.logger
	}
	return &Watcher{
		c:      c,
		store:  store,
		filter: filter,
		logger: logger,
		timing: watchTiming{
			wait:         watchWait,
			seedWait:     watchSeedWait,
			minDelay:     watchMinDelay,
			backoffMin:   watchBackoffMin,
			backoffMax:   watchBackoffMax,
			retryTimeout: watchRetryTimeout,
		},
		nodeWatchLimit: DefaultNodeWatchLimit,
		updates:        make(chan Update, updatesBuffer),
		notify:         make(chan struct{}, 1),
		services:       map[string]bool{},
		cat:            newCatalogWatch(),
		pending:        map[updateKey]Update{},
		failing:        map[*watch]error{},
		wake:           make(chan struct{}),
	}
}

// Updates returns the channel of updates. It is closed when Run returns.
func (w *Watcher) Updates() <-chan Update { return w.updates }

// Services sets the Consul services to follow (the routed ones). A service no longer listed is
// forgotten (its queued update is dropped; one already on the channel may still arrive); a new one
// first reports its current instances, as soon as the catalog has been read. Invalid names are
// logged and skipped. Safe to call at any time, before Run too. It costs no Consul query.
func (w *Watcher) Services(names []string) {
	want := make(map[string]bool, len(names))
	for _, name := range names {
		if err := checkServiceName(name); err != nil {
			w.logger.Warn("consul watch: ignoring an invalid service name", "service", name, "error", err)
			continue
		}
		want[name] = true
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for name := range w.services {
		if !want[name] {
			w.cat.forget(name)
			w.dequeueLocked(updateKey{kind: kindService, service: name})
		}
	}
	for name := range want {
		if !w.services[name] {
			w.cat.dirty[name] = true
		}
	}
	w.services = want
	w.cat.signal()
}

// Run watches until ctx ends, then stops every watch, waits for its goroutines, closes the Updates
// channel and returns nil. It fails at once for an invalid health filter, and when called twice.
func (w *Watcher) Run(ctx context.Context) error {
	w.mu.Lock()
	if w.ran {
		w.mu.Unlock()
		return errors.New("consul watch: Run called twice")
	}
	w.ran = true
	f, err := ParseHealthFilter(string(w.filter))
	if err != nil {
		w.mu.Unlock()
		close(w.updates)
		return fmt.Errorf("consul watch: %w", err)
	}
	w.filter = f
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	w.runCtx = runCtx
	if w.store != nil {
		src := w.routeSource() // takes the seed, under w.mu
		w.routes = w.startLocked(updateKey{kind: kindRoutes}, "kv "+w.store.Prefix()+"/",
			func(ctx context.Context, wt *watch) { follow(ctx, w, wt, src) })
	}
	w.startCatalogLocked()
	w.wg.Go(func() { w.send(runCtx) })
	w.mu.Unlock()

	<-ctx.Done()

	w.mu.Lock()
	w.runCtx = nil
	w.stopCatalogLocked()
	if w.routes != nil {
		w.stopLocked(w.routes)
		w.routes = nil
	}
	w.mu.Unlock()
	cancel()
	w.wg.Wait()
	close(w.updates)
	return nil
}

// startLocked runs loop in a goroutine, under a context that stopLocked or the end of Run cancels.
func (w *Watcher) startLocked(key updateKey, name string, loop func(context.Context, *watch)) *watch {
	ctx, cancel := context.WithCancel(w.runCtx)
	wt := &watch{key: key, name: name, cancel: cancel}
	w.wg.Go(func() {
		defer cancel()
		loop(ctx, wt)
	})
	return wt
}

// stopLocked cancels a watch, drops its queued update and takes it out of the outage.
func (w *Watcher) stopLocked(wt *watch) {
	wt.stopped = true
	wt.cancel()
	w.dequeueLocked(wt.key)
	if _, ok := w.failing[wt]; ok {
		delete(w.failing, wt)
		if w.runCtx != nil {
			w.outageOverLocked()
		}
	}
}

// source is what one watch reads: fetch runs one (blocking) query from index, for at most wait,
// and returns the content and Consul's new index; same compares two contents; deliver takes a
// content that differs from the last one delivered, and any content read after a failure or after
// the index went backwards (reset: its index may be lower than the last one delivered).
// A seeded source starts from seed, a content read at seedIndex and already delivered (Seed*):
// its first query blocks from seedIndex.
type source[T any] struct {
	fetch     func(ctx context.Context, index uint64, wait time.Duration) (T, uint64, error)
	same      func(a, b T) bool
	deliver   func(wt *watch, v T, index uint64, reset bool)
	seed      *T
	seedIndex uint64
}

// follow runs the blocking queries of one watch until ctx ends, and reports each content that
// differs from the last one reported (Consul also wakes blocking queries for unrelated writes).
// It follows Consul's advice on blocking queries: the index is reset to 0 when it goes backwards
// (and after a failure, since a restarted Consul starts over from a lower index, and a query from
// the old one would wait for the whole wait time), an index of 0 is replaced by 1, and queries
// whose index did not move forward are spaced by the minimum delay. The first attempt after a
// failure is bounded by the retry timeout: a Consul that is starting may accept a request and
// answer it only when the client gives up; a read sent a moment later is answered at once.
func follow[T any](ctx context.Context, w *Watcher, wt *watch, src source[T]) {
	var (
		index    uint64
		last     T
		known    bool // last was reported
		failed   bool // the last read failed
		backoff  = w.timing.backoffMin
		timeouts int // attempts in a row that timed out, after a failure
	)
	seeded := src.seed != nil
	if seeded {
		last, known, index = *src.seed, true, src.seedIndex
	}
	for {
		started := time.Now()
		fctx, cancel := ctx, context.CancelFunc(func() {})
		wait := w.timing.wait
		if seeded {
			wait, seeded = w.timing.seedWait, false
		}
		if failed {
			// Consul may accept the connection and not answer (while it starts): this attempt
			// gives up early, and the next one comes at once. The limit grows by one retry
			// timeout every 8 attempts in a row that time out (up to the client's request
			// timeout), so that a read that is merely slow (a huge catalog) still succeeds.
			limit := min(w.timing.retryTimeout*time.Duration(1+timeouts/8), w.c.timeout)
			fctx, cancel = context.WithTimeout(ctx, limit)
		}
		v, next, err := src.fetch(fctx, index, wait)
		timedOut := failed && fctx.Err() != nil
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			if timedOut && !errors.Is(err, ErrUnavailable) {
				err = fmt.Errorf("%w: %w", ErrUnavailable, err)
			}
			wake := w.failed(wt, err)
			failed = true
			index = 0
			if timedOut {
				timeouts++
				continue
			}
			timeouts = 0
			if !pause(ctx, jitter(backoff), wake) {
				return
			}
			backoff = min(2*backoff, w.timing.backoffMax)
			continue
		}
		backoff, timeouts = w.timing.backoffMin, 0
		if !known || failed || !src.same(last, v) {
			src.deliver(wt, v, next, failed || next < index)
			last, known = v, true
		} else {
			w.logger.Debug("consul watch: woke up, nothing changed", "watch", wt.name, "index", next)
		}
		if failed {
			w.recovered(wt)
			failed = false
		}
		delay := time.Duration(0)
		switch {
		case next == 0:
			// Consul should never answer 0; a query from 0 returns at once, every time.
			next, delay = 1, w.timing.minDelay
		case next < index:
			w.logger.Info("consul watch: the index went backwards, starting over", "watch", wt.name, "index", next, "previous", index)
			next, delay = 0, w.timing.minDelay
		case next == index:
			delay = w.timing.minDelay
		}
		index = next
		if !pause(ctx, delay-time.Since(started), nil) {
			return
		}
	}
}

// pause waits for d (nothing when d <= 0), until wake is closed, or until ctx ends (false).
func pause(ctx context.Context, d time.Duration, wake <-chan struct{}) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-wake:
	case <-ctx.Done():
		return false
	}
	return true
}

// jitter spreads d over ±20%, so that the watches and proxies of one outage do not retry in step.
func jitter(d time.Duration) time.Duration {
	if spread := 2 * d / 5; spread > 0 {
		return d - d/5 + rand.N(spread)
	}
	return d
}

// query runs one read through the client's failover (Client.do); a blocking query from index, for
// at most wait, when index > 0. Client.do bounds each attempt with the client's request timeout,
// shorter than the wait of a blocking query: a blocking attempt runs under its own deadline
// instead (the wait, Consul's jitter of up to 1/16 of it, and the request timeout), still ended by
// ctx. A blocking attempt that fails after the request timeout counts as the agent's failure, and
// the next agent is tried, as for a timeout.
func (w *Watcher) query(ctx context.Context, index uint64, wait time.Duration, call func(a *api.Client, q *api.QueryOptions) (*api.QueryMeta, error)) (uint64, error) {
	var last uint64
	err := w.c.do(ctx, func(reqCtx context.Context, a *api.Client) error {
		if index > 0 {
			var cancel context.CancelFunc
			reqCtx, cancel = context.WithTimeout(ctx, wait+wait/16+w.c.timeout)
			defer cancel()
		}
		meta, err := call(a, from(reqCtx, index, wait))
		if err != nil {
			return err
		}
		if meta != nil {
			last = meta.LastIndex
		}
		return nil
	})
	return last, err
}

// routeSource follows the versions of the route table's folders. It reads only the keys' names and
// indexes: a folder's keys are parsed by whoever reads the folders that changed. It starts from
// the seed that SeedRoutes gave, if any. w.mu is held.
func (w *Watcher) routeSource() source[map[string]route.KVVersion] {
	s := w.store
	var seed *map[string]route.KVVersion
	var seedIndex uint64
	if w.routesSeed != nil {
		seed, seedIndex = &w.routesSeed.versions, w.routesSeed.index
		w.routesSeed = nil
	}
	body := &bytes.Buffer{}
	return source[map[string]route.KVVersion]{
		seed:      seed,
		seedIndex: seedIndex,
		fetch: func(ctx context.Context, index uint64, wait time.Duration) (map[string]route.KVVersion, uint64, error) {
			// The listing's body comes to body (see bodySink), kept from one query to the next.
			last, err := w.query(ctx, index, wait, func(a *api.Client, q *api.QueryOptions) (*api.QueryMeta, error) {
				body.Reset() // Consul's 404 (no key under the prefix) leaves it empty
				_, meta, err := a.KV().List(s.prefix+"/", q.WithContext(withBodySink(q.Context(), body)))
				return meta, err
			})
			if err != nil {
				return nil, 0, fmt.Errorf("consul watch kv %s/: %w", s.prefix, err)
			}
			var keys []kvEntry
			if body.Len() > 0 {
				if keys, err = parseKVEntries(body.Bytes(), false); err != nil {
					return nil, 0, fmt.Errorf("consul watch kv %s/: %w", s.prefix, err)
				}
			}
			return s.versionsOf(keys), last, nil
		},
		same: maps.Equal[map[string]route.KVVersion, map[string]route.KVVersion],
		deliver: func(wt *watch, vs map[string]route.KVVersion, index uint64, _ bool) {
			w.report(wt, Update{RoutesChanged: true, Versions: vs, Index: index})
		},
	}
}

// report queues the update of a watch that still runs.
func (w *Watcher) report(wt *watch, u Update) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !wt.stopped {
		w.enqueueLocked(wt.key, u)
	}
}

// failed records a failed read, reports the outage when this watch was reading until now, and
// returns the channel that wakes the watch up early when another one reads again.
func (w *Watcher) failed(wt *watch, err error) <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	wake := w.wake
	if wt.stopped {
		return wake
	}
	if _, ok := w.failing[wt]; ok {
		w.failing[wt] = err
		w.logger.Debug("consul watch: still failing, retrying", "watch", wt.name, "error", err)
		return wake
	}
	if len(w.failing) == 0 {
		w.since = time.Now()
		w.logger.Warn("consul watch: cannot read Consul, retrying with backoff", "watch", wt.name, "error", err)
	} else {
		w.logger.Debug("consul watch: cannot read Consul, retrying with backoff", "watch", wt.name, "error", err)
	}
	w.failing[wt] = err
	w.enqueueLocked(updateKey{kind: kindOutage}, Update{Err: err, Since: w.since})
	return wake
}

// recovered records that a failed watch reads again (it has just queued its state), and wakes the
// watches waiting to retry: Consul is probably back for them too.
func (w *Watcher) recovered(wt *watch) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, ok := w.failing[wt]; !ok {
		return
	}
	delete(w.failing, wt)
	close(w.wake)
	w.wake = make(chan struct{})
	if len(w.failing) > 0 {
		// Others still fail: the outage goes on after this watch's state, with the error of one
		// that still fails.
		w.enqueueLocked(updateKey{kind: kindOutage}, Update{Err: w.failingErrLocked(), Since: w.since})
		return
	}
	w.outageOverLocked()
}

// failingErrLocked is the last error of a watch that fails, the first by name of those that do.
func (w *Watcher) failingErrLocked() error {
	var first *watch
	for wt := range w.failing {
		if first == nil || wt.name < first.name {
			first = wt
		}
	}
	if first == nil {
		return nil
	}
	return w.failing[first]
}

// outageOverLocked ends the outage once no watch fails: a queued outage report is dropped, since
// the states that follow it are newer.
func (w *Watcher) outageOverLocked() {
	if len(w.failing) > 0 || w.since.IsZero() {
		return
	}
	w.logger.Info("consul watch: reading Consul again", "outage", time.Since(w.since).Round(time.Millisecond))
	w.since = time.Time{}
	// The outage's last report may already be delivered: its end is reported in its place, after
	// the states read again, which are newer.
	w.enqueueLocked(updateKey{kind: kindOutage}, Update{Recovered: true})
}

// enqueueLocked queues u as the latest state of key, replacing the one queued before, and moves
// key to the end of the queue: the consumer receives states in the order of their latest change.
func (w *Watcher) enqueueLocked(key updateKey, u Update) {
	w.dequeueLocked(key)
	w.pending[key] = u
	w.order = append(w.order, key)
	select {
	case w.notify <- struct{}{}:
	default:
	}
}

func (w *Watcher) dequeueLocked(key updateKey) {
	if _, ok := w.pending[key]; !ok {
		return
	}
	delete(w.pending, key)
	if i := slices.Index(w.order, key); i >= 0 {
		w.order = slices.Delete(w.order, i, i+1)
	}
}

// next takes the first queued update.
func (w *Watcher) next() (Update, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.order) == 0 {
		return Update{}, false
	}
	key := w.order[0]
	w.order = slices.Delete(w.order, 0, 1)
	u := w.pending[key]
	delete(w.pending, key)
	return u, true
}

// send moves queued updates to the Updates channel until ctx ends. It alone writes the channel,
// and it alone waits for a slow consumer.
func (w *Watcher) send(ctx context.Context) {
	for {
		u, ok := w.next()
		if !ok {
			select {
			case <-w.notify:
				continue
			case <-ctx.Done():
				return
			}
		}
		select {
		case w.updates <- u:
		case <-ctx.Done():
			return
		}
	}
}

// instancesFrom turns a health answer into the instance list of Client.Instances: the instances
// that pass f, with a valid address and port (the others are logged), sorted, without duplicates.
//
// It repeats the body of Client.Instances, which does not expose the query index a blocking query
// needs; Instances should call it (catalog.go is not this change's to edit). TestWatcherInstances
// checks that both agree.
func (c *Client) instancesFrom(service string, f HealthFilter, entries []*api.ServiceEntry) []route.Instance {
	out := make([]route.Instance, 0, len(entries))
	for _, e := range entries {
		if e == nil || e.Service == nil {
			continue
		}
		if !f.keeps(e.Checks.AggregatedStatus()) {
			continue
		}
		addr := e.Service.Address
		if addr == "" && e.Node != nil {
			addr = e.Node.Address
		}
		host, ok := validHost(addr)
		if !ok || e.Service.Port < 1 || e.Service.Port > 65535 {
			node := ""
			if e.Node != nil {
				node = e.Node.Node
			}
			c.logger.Warn("consul: skipping an instance with an invalid address or port",
				"service", service, "id", e.Service.ID, "node", node,
				"address", addr, "port", e.Service.Port)
			continue
		}
		out = append(out, route.Instance{Address: host, Port: e.Service.Port})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Address != out[j].Address {
			return out[i].Address < out[j].Address
		}
		return out[i].Port < out[j].Port
	})
	return slices.Compact(out)
}
