package consul

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/hashicorp/consul/api"

	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// The watch of the catalog follows every service instance with a number of blocking queries that
// does not depend on the number of services:
//
//   - /v1/catalog/nodes: the node list (one node per Docker host, so few);
//   - /v1/catalog/node-services/<node>, one per node: every service instance on the node, with its
//     address and port;
//   - /v1/health/state/any: every health check, of nodes and of services.
//
// From these it computes the instances of each followed service exactly as Client.Instances does
// (the entries of /v1/health/service/<name> are rebuilt: the node's checks and the instance's own
// apply to it) and reports the services whose list changed.
//
// The two kinds of read are not one snapshot. A registration writes a service and its checks in
// one transaction, and a deregistration removes both; read apart, a new instance whose check is
// critical could look healthy (its service read, not yet its check), and so could an instance
// being deregistered (its checks gone, not yet its service). Two rules keep every computed state
// one that Consul held: after services were added or changed at index I, the checks are used only
// once read at an index >= I, or read again; after checks of a node vanished at index I, that
// node's services are used only once read at an index >= I, or read again. Consul answers reads
// from the leader, so a read sent later sees a state at least as new (a read from scratch asks for
// consistency, see fresh: a leader that has just been elected may not have replayed its log yet).

// serviceState is one service instance of a node, as the catalog lists it.
type serviceState struct {
	ID, Name, Address string
	Port              int
}

// nodeServices is what /v1/catalog/node-services/<node> says of one node.
type nodeServices struct {
	address  string
	services []serviceState // sorted by ID
}

func sameNodeServices(a, b nodeServices) bool {
	return a.address == b.address && slices.Equal(a.services, b.services)
}

// checkState is one health check, as far as the health filter cares.
type checkState struct {
	Node, CheckID, ServiceID, Status string
}

func sortChecks(cs []checkState) {
	sort.Slice(cs, func(i, j int) bool {
		if cs[i].Node != cs[j].Node {
			return cs[i].Node < cs[j].Node
		}
		return cs[i].CheckID < cs[j].CheckID
	})
}

// catalogSnapshot is the catalog as read: the services of every node, and every check; and the
// index of each read, from which a watch that starts from the snapshot blocks.
type catalogSnapshot struct {
	nodes  map[string]nodeServices
	checks []checkState

	nodesIndex  uint64            // of the node list
	nodeIndex   map[string]uint64 // of the services of each node
	checksIndex uint64
}

// entries rebuilds, for each service of want, the answer of /v1/health/service/<name> (without the
// passing filter): its instances on every node, each with the node's checks and its own.
// Nodes and instances come in a fixed order.
func (s catalogSnapshot) entries(want map[string]bool) map[string][]*api.ServiceEntry {
	type key struct{ node, service string }
	checks := make(map[key]api.HealthChecks, len(s.checks))
	for _, c := range s.checks {
		k := key{c.Node, c.ServiceID}
		checks[k] = append(checks[k], &api.HealthCheck{Node: c.Node, CheckID: c.CheckID, ServiceID: c.ServiceID, Status: c.Status})
	}
	names := make([]string, 0, len(s.nodes))
	for n := range s.nodes {
		names = append(names, n)
	}
	sort.Strings(names)
	out := make(map[string][]*api.ServiceEntry, len(want))
	for _, n := range names {
		ns := s.nodes[n]
		node := &api.Node{Node: n, Address: ns.address}
		nodeChecks := checks[key{n, ""}]
		for _, svc := range ns.services {
			if !want[svc.Name] {
				continue
			}
			own := checks[key{n, svc.ID}]
			all := make(api.HealthChecks, 0, len(nodeChecks)+len(own))
			all = append(append(all, nodeChecks...), own...)
			out[svc.Name] = append(out[svc.Name], &api.ServiceEntry{
				Node:    node,
				Service: &api.AgentService{ID: svc.ID, Service: svc.Name, Address: svc.Address, Port: svc.Port},
				Checks:  all,
			})
		}
	}
	return out
}

// fingerprint sums up what the instance list of a service is computed from, so that a service
// whose entries did not change is not computed (nor its invalid instances logged) again.
func fingerprint(f HealthFilter, entries []*api.ServiceEntry) string {
	var b strings.Builder
	for _, e := range entries {
		b.WriteString(e.Node.Node)
		b.WriteByte(0)
		b.WriteString(e.Service.ID)
		b.WriteByte(0)
		b.WriteString(e.Service.Address)
		b.WriteByte(0)
		b.WriteString(e.Node.Address)
		b.WriteByte(0)
		b.WriteString(strconv.Itoa(e.Service.Port))
		b.WriteByte(0)
		b.WriteString(strconv.FormatBool(f.keeps(e.Checks.AggregatedStatus())))
		b.WriteByte(1)
	}
	return b.String()
}

// checkNodeName rejects a node name that would address another Consul path.
func checkNodeName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/?#%\\") ||
		strings.ContainsFunc(name, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
		return fmt.Errorf("node name %q cannot be read through the HTTP API", name)
	}
	return nil
}

// nodeList is the node list: the names, sorted, and the address of each.
type nodeList struct {
	names, addresses []string
}

func sameNodeList(a, b nodeList) bool {
	return slices.Equal(a.names, b.names) && slices.Equal(a.addresses, b.addresses)
}

// readNodes reads the node names (sorted; invalid ones are logged and skipped).
func (c *Client) readNodes(ctx context.Context, q func(ctx context.Context, call func(a *api.Client, q *api.QueryOptions) (*api.QueryMeta, error)) (uint64, error)) ([]string, uint64, error) {
	list, index, err := c.readNodeList(ctx, q)
	return list.names, index, err
}

// readNodeList reads the node list (sorted by name; invalid names are logged and skipped; a name
// listed twice is kept once).
func (c *Client) readNodeList(ctx context.Context, q func(ctx context.Context, call func(a *api.Client, q *api.QueryOptions) (*api.QueryMeta, error)) (uint64, error)) (nodeList, uint64, error) {
	var nodes []*api.Node
	last, err := q(ctx, func(a *api.Client, o *api.QueryOptions) (*api.QueryMeta, error) {
		var meta *api.QueryMeta
		var err error
		nodes, meta, err = a.Catalog().Nodes(o)
		return meta, err
	})
	if err != nil {
		return nodeList{}, 0, fmt.Errorf("consul catalog nodes: %w", err)
	}
	valid := make([]*api.Node, 0, len(nodes))
	for _, n := range nodes {
		if n == nil {
			continue
		}
		if err := checkNodeName(n.Node); err != nil {
			c.logger.Warn("consul: skipping a node", "error", err)
			continue
		}
		valid = append(valid, n)
	}
	slices.SortStableFunc(valid, func(a, b *api.Node) int { return strings.Compare(a.Node, b.Node) })
	valid = slices.CompactFunc(valid, func(a, b *api.Node) bool { return a.Node == b.Node })
	list := nodeList{names: make([]string, len(valid)), addresses: make([]string, len(valid))}
	for i, n := range valid {
		list.names[i], list.addresses[i] = n.Node, n.Address
	}
	return list, last, nil
}

// nodeServiceList is the part of /v1/catalog/node-services/<node>'s answer that the proxy uses.
// Decoding only these fields, not api.CatalogNodeServiceList's (tags, meta, weights, proxy and
// connect settings of every service), takes the decode of a node's services to a fraction: a
// pool watch decodes every node of the catalog after each change.
type nodeServiceList struct {
	Node *struct {
		Address string
	}
	Services []*struct {
		ID, Service, Address string
		Port                 int
	}
}

// readNodeServices reads the services of one node; a node Consul does not know has none.
func readNodeServices(ctx context.Context, node string, q func(ctx context.Context, call func(a *api.Client, q *api.QueryOptions) (*api.QueryMeta, error)) (uint64, error)) (nodeServices, uint64, error) {
	var list nodeServiceList
	last, err := q(ctx, func(a *api.Client, o *api.QueryOptions) (*api.QueryMeta, error) {
		list = nodeServiceList{}
		return a.Raw().Query("/v1/catalog/node-services/"+node, &list, o)
	})
	if err != nil {
		return nodeServices{}, 0, fmt.Errorf("consul catalog node-services %s: %w", node, err)
	}
	return list.state(), last, nil
}

// state is the node's address and its services sorted by ID.
func (l nodeServiceList) state() nodeServices {
	var ns nodeServices
	if l.Node == nil {
		return ns
	}
	ns.address = l.Node.Address
	ns.services = make([]serviceState, 0, len(l.Services))
	for _, s := range l.Services {
		if s == nil {
			continue
		}
		ns.services = append(ns.services, serviceState{ID: s.ID, Name: s.Service, Address: s.Address, Port: s.Port})
	}
	sort.Slice(ns.services, func(i, j int) bool { return ns.services[i].ID < ns.services[j].ID })
	return ns
}

// readChecks reads every health check.
func readChecks(ctx context.Context, q func(ctx context.Context, call func(a *api.Client, q *api.QueryOptions) (*api.QueryMeta, error)) (uint64, error)) ([]checkState, uint64, error) {
	var hc api.HealthChecks
	last, err := q(ctx, func(a *api.Client, o *api.QueryOptions) (*api.QueryMeta, error) {
		var meta *api.QueryMeta
		var err error
		hc, meta, err = a.Health().State(api.HealthAny, o)
		return meta, err
	})
	if err != nil {
		return nil, 0, fmt.Errorf("consul health state any: %w", err)
	}
	out := make([]checkState, 0, len(hc))
	for _, c := range hc {
		if c == nil {
			continue
		}
		out = append(out, checkState{Node: c.Node, CheckID: c.CheckID, ServiceID: c.ServiceID, Status: c.Status})
	}
	sortChecks(out)
	return out, last, nil
}

// once runs one non-blocking read through the client's failover.
func (c *Client) once(ctx context.Context, call func(a *api.Client, q *api.QueryOptions) (*api.QueryMeta, error)) (uint64, error) {
	var last uint64
	err := c.do(ctx, func(ctx context.Context, a *api.Client) error {
		meta, err := call(a, fresh(ctx))
		if err == nil && meta != nil {
			last = meta.LastIndex
		}
		return err
	})
	return last, err
}

// bulkReadAttempts bounds how many times InstancesOf reads the catalog again when checks changed
// while it read the nodes' services.
const bulkReadAttempts = 3

// InstancesOf lists the instances of many services at once, each as Instances lists it (same
// filter, validation, order), with a number of requests that does not depend on the number of
// services: the node list, the services of each node, and every check. The result has an entry,
// possibly empty, for every valid name of services; invalid names are an error.
func (c *Client) InstancesOf(ctx context.Context, services []string, filter HealthFilter) (map[string][]route.Instance, error) {
	f, want, err := wanted(services, filter)
	if err != nil {
		return nil, err
	}
	r, err := c.ReadCatalog(ctx)
	if err != nil {
		return nil, err
	}
	return r.instances(want, f), nil
}

// wanted checks a filter and service names, and returns the filter parsed and the set of names.
func wanted(services []string, filter HealthFilter) (HealthFilter, map[string]bool, error) {
	f, err := ParseHealthFilter(string(filter))
	if err != nil {
		return "", nil, err
	}
	want := make(map[string]bool, len(services))
	for _, s := range services {
		if err := checkServiceName(s); err != nil {
			return "", nil, err
		}
		want[s] = true
	}
	return f, want, nil
}

// CatalogRead is one read of the whole catalog, as InstancesOf makes it. The instances of any
// service can be computed from it, and a Watcher can start from it (SeedCatalog) rather than read
// the whole catalog again.
type CatalogRead struct {
	c    *Client
	snap catalogSnapshot
}

// ReadCatalog reads the whole catalog with a number of requests that does not depend on the
// number of services (see InstancesOf).
func (c *Client) ReadCatalog(ctx context.Context) (*CatalogRead, error) {
	snap, err := c.readCatalog(ctx)
	if err != nil {
		return nil, err
	}
	return &CatalogRead{c: c, snap: snap}, nil
}

// Instances lists the instances of services in the read, as InstancesOf does.
func (r *CatalogRead) Instances(services []string, filter HealthFilter) (map[string][]route.Instance, error) {
	f, want, err := wanted(services, filter)
	if err != nil {
		return nil, err
	}
	return r.instances(want, f), nil
}

func (r *CatalogRead) instances(want map[string]bool, f HealthFilter) map[string][]route.Instance {
	entries := r.snap.entries(want)
	out := make(map[string][]route.Instance, len(want))
	for s := range want {
		out[s] = r.c.instancesFrom(s, f, entries[s])
	}
	return out
}

// readCatalog reads the whole catalog: the checks, the services of every node, then the checks
// again. When the checks did not change meanwhile, no registration or deregistration that has
// checks happened while the services were read, and the snapshot is one Consul held; otherwise it
// reads again (a few times, then keeps the last read).
func (c *Client) readCatalog(ctx context.Context) (catalogSnapshot, error) {
	checks, before, err := readChecks(ctx, c.once)
	if err != nil {
		return catalogSnapshot{}, err
	}
	for attempt := 1; ; attempt++ {
		names, nodesIndex, err := c.readNodes(ctx, c.once)
		if err != nil {
			return catalogSnapshot{}, err
		}
		nodes, indexes, err := c.readAllNodeServices(ctx, names)
		if err != nil {
			return catalogSnapshot{}, err
		}
		snap := catalogSnapshot{nodes: nodes, nodesIndex: nodesIndex, nodeIndex: indexes}
		after, index, err := readChecks(ctx, c.once)
		if err != nil {
			return catalogSnapshot{}, err
		}
		snap.checks, snap.checksIndex = after, index
		if index == before && slices.Equal(checks, after) || attempt == bulkReadAttempts {
			return snap, nil
		}
		checks, before = after, index
	}
}

// bulkReadWorkers is the number of nodes whose services readAllNodeServices reads at once.
const bulkReadWorkers = 4

// readAllNodeServices reads the services of every node of names, bulkReadWorkers nodes at a time
// (the reads overlap Consul's work with the decoding of the answers), and the index of each read.
// The first failure stops the others and is returned.
func (c *Client) readAllNodeServices(ctx context.Context, names []string) (map[string]nodeServices, map[string]uint64, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu      sync.Mutex
		out     = make(map[string]nodeServices, len(names))
		indexes = make(map[string]uint64, len(names))
		first   error
		wg      sync.WaitGroup
	)
	next := make(chan string)
	for range min(bulkReadWorkers, len(names)) {
		wg.Go(func() {
			for n := range next {
				ns, index, err := readNodeServices(ctx, n, c.once)
				mu.Lock()
				if err != nil && first == nil {
					first = err
					cancel()
				}
				out[n], indexes[n] = ns, index
				mu.Unlock()
			}
		})
	}
feed:
	for _, n := range names {
		select {
		case next <- n:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	if first != nil {
		return nil, nil, first
	}
	if len(out) < len(names) {
		return nil, nil, ctx.Err()
	}
	return out, indexes, nil
}
