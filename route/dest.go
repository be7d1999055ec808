package route

import (
	"fmt"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// ReqMode is how a destination's traffic is handled: HTTP requests routed by path and host, TCP
// connections on a port of their own, or TLS connections passed through unopened and routed by the
// name the client asks for (SNI).
type ReqMode string

// The request modes.
const (
	ModeHTTP ReqMode = "http"
	ModeTCP  ReqMode = "tcp"
	ModeSNI  ReqMode = "sni"
)

var reqModes = []ReqMode{ModeHTTP, ModeTCP, ModeSNI}

// Dest is one destination of a route: which requests or connections reach which port of the
// service. The unindexed parameters (servicePath, port, srcPort, ...) make destination 0; the indexed
// ones (servicePath.1, port.1, ...) make the others. Everything else in a route (users, rewriting,
// headers, timeouts) applies to every HTTP destination.
type Dest struct {
	// Index is 0 for the unindexed parameters, N for servicePath.N and the others.
	Index int
	// ServicePath lists the paths that reach this destination (HTTP).
	ServicePath []string
	// ServiceDomain restricts an HTTP destination to these hosts; for SNI it lists the names routed.
	ServiceDomain []string
	// PathType is how ServicePath is matched.
	PathType PathType
	// Port, when set, selects the Consul service registered for that port of the service,
	// <service>-<port>: Registrator's name for each port of a container that exposes several.
	Port int
	// ReqMode is http (the default), tcp or sni.
	ReqMode ReqMode
	// SrcPort is the proxy's port of a tcp or sni destination.
	SrcPort int
}

// Mode is the destination's request mode, http when unset.
func (d Dest) Mode() ReqMode {
	if d.ReqMode == "" {
		return ModeHTTP
	}
	return d.ReqMode
}

func (d Dest) equal(o Dest) bool {
	return d.Index == o.Index && slices.Equal(d.ServicePath, o.ServicePath) &&
		slices.Equal(d.ServiceDomain, o.ServiceDomain) && d.PathType == o.PathType &&
		d.Port == o.Port && d.Mode() == o.Mode() && d.SrcPort == o.SrcPort
}

// param names a destination's parameter as the request gives it: servicePath, servicePath.2, ...
func (d Dest) param(name string) string {
	if d.Index == 0 {
		return name
	}
	return name + "." + strconv.Itoa(d.Index)
}

// Destinations returns the route's destinations, destination 0 (the unindexed parameters) first
// when the route has one.
func (r Route) Destinations() []Dest {
	out := make([]Dest, 0, 1+len(r.Dests))
	if r.hasDest0() {
		out = append(out, Dest{ServicePath: r.ServicePath, ServiceDomain: r.ServiceDomain,
			PathType: r.PathType, Port: r.Port, ReqMode: r.ReqMode, SrcPort: r.SrcPort})
	}
	return append(out, r.Dests...)
}

// TakesPort reports whether a destination of the route is TCP or SNI: one that takes a source port
// of the proxy. It is Destinations' answer without making the list.
func (r Route) TakesPort() bool {
	if r.hasDest0() && (Dest{ReqMode: r.ReqMode}).Mode() != ModeHTTP {
		return true
	}
	for _, d := range r.Dests {
		if d.Mode() != ModeHTTP {
			return true
		}
	}
	return false
}

// hasDest0 reports whether the unindexed parameters make a destination: a path or a source port.
func (r Route) hasDest0() bool { return len(r.ServicePath) > 0 || r.SrcPort != 0 }

// ConsulServiceFor is the Consul service whose instances serve a destination.
func (r Route) ConsulServiceFor(d Dest) string {
	if d.Port != 0 {
		return r.ConsulService() + "-" + strconv.Itoa(d.Port)
	}
	return r.ConsulService()
}

// ConsulServices lists, once each and sorted, the Consul services whose instances the route uses.
func (r Route) ConsulServices() []string {
	var out []string
	for _, d := range r.Destinations() {
		out = append(out, r.ConsulServiceFor(d))
	}
	if len(out) == 0 {
		out = append(out, r.ConsulService())
	}
	sort.Strings(out)
	return slices.Compact(out)
}

// Indexed parameters: the destination parameters that may carry an index (servicePath.1, ...).
const (
	ParamPort    = "port"
	ParamReqMode = "reqMode"
	ParamSrcPort = "srcPort"
)

var indexedParams = []string{ParamServicePath, ParamServiceDomain, ParamPathType, ParamPort, ParamReqMode, ParamSrcPort}

// MaxDests bounds the indexed destinations of one route (servicePath.1 to servicePath.20).
const MaxDests = 20

// parseIndexed reads the indexed destinations of a query (servicePath.N, port.N, ...).
func parseIndexed(q url.Values) ([]Dest, error) {
	byIndex := map[int]*Dest{}
	for k, vs := range q {
		base, idx, ok := strings.Cut(k, ".")
		if !ok {
			continue
		}
		if !slices.Contains(indexedParams, base) {
			return nil, paramErr(k, "is not an indexed parameter (those are %s, each followed by .1 to .%d)",
				strings.Join(indexedParams, ", "), MaxDests)
		}
		n, err := strconv.Atoi(idx)
		if err != nil || n < 1 || n > MaxDests || idx[0] == '0' || idx[0] == '+' {
			return nil, paramErr(k, "has index %s; indexes go from 1 to %d", quoteForMessage(idx), MaxDests)
		}
		if base != ParamServicePath && base != ParamServiceDomain && len(vs) > 1 {
			return nil, paramErr(k, "given %d times; give it once", len(vs))
		}
		d := byIndex[n]
		if d == nil {
			d = &Dest{Index: n}
			byIndex[n] = d
		}
		v := strings.Join(vs, ",")
		switch base {
		case ParamServicePath:
			d.ServicePath = splitList(vs)
		case ParamServiceDomain:
			d.ServiceDomain = splitList(vs)
		case ParamPathType:
			d.PathType = PathType(v)
		case ParamPort:
			if d.Port, err = parsePort(k, v); err != nil {
				return nil, err
			}
		case ParamSrcPort:
			if d.SrcPort, err = parsePort(k, v); err != nil {
				return nil, err
			}
		case ParamReqMode:
			d.ReqMode = ReqMode(v)
		}
	}
	out := make([]Dest, 0, len(byIndex))
	for _, d := range byIndex {
		if d.PathType == "" {
			d.PathType = DefaultPathType
		}
		out = append(out, *d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Index < out[j].Index })
	return out, nil
}

// parsePort reads a TCP port number; an empty value is unset.
func parsePort(param, v string) (int, error) {
	if v == "" {
		return 0, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 || n > 65535 || v[0] == '+' || v[0] == '0' {
		return 0, paramErr(param, "%s is not a port number (1 to 65535)", quoteForMessage(v))
	}
	return n, nil
}

// validateDests checks every destination, and that no two of the route's TCP or SNI destinations
// claim the same source port in a way HAProxy cannot serve.
func (r Route) validateDests() error {
	dests := r.Destinations()
	if len(dests) == 0 {
		if m := r.Mode(); m != ModeHTTP {
			return paramErr(ParamSrcPort, "is required with reqMode %s", m)
		}
		return paramErr(ParamServicePath, "is required")
	}
	if !r.hasDest0() && (len(r.ServiceDomain) > 0 || r.Port != 0 || r.ReqMode != "") {
		// Unindexed destination parameters without a path or source port belong to no destination.
		return paramErr(ParamServicePath, "is required with the unindexed serviceDomain, port or reqMode (or use srcPort)")
	}
	srcModes := map[int]ReqMode{}
	for _, d := range dests {
		if err := d.validate(); err != nil {
			return err
		}
		if d.Mode() == ModeHTTP {
			continue
		}
		if m, ok := srcModes[d.SrcPort]; ok && (m != ModeSNI || d.Mode() != ModeSNI) {
			return paramErr(d.param(ParamSrcPort), "port %d is already taken by another destination of %s", d.SrcPort, r.ServiceName)
		}
		srcModes[d.SrcPort] = d.Mode()
	}
	if len(r.Dests) > MaxDests {
		return paramErr(ParamServicePath, "has more than %d indexed destinations", MaxDests)
	}
	return nil
}

func (d Dest) validate() error {
	if !slices.Contains(reqModes, d.Mode()) {
		return paramErr(d.param(ParamReqMode), "%s is not one of http, tcp, sni", quoteForMessage(string(d.ReqMode)))
	}
	if err := validatePort(d.param(ParamPort), d.Port); err != nil {
		return err
	}
	if err := validatePort(d.param(ParamSrcPort), d.SrcPort); err != nil {
		return err
	}
	for _, dom := range d.ServiceDomain {
		if err := validateDomain(d.param(ParamServiceDomain), dom); err != nil {
			return err
		}
	}
	switch d.Mode() {
	case ModeHTTP:
		if d.SrcPort != 0 {
			return paramErr(d.param(ParamSrcPort), "is for reqMode tcp or sni; HTTP routes are served on the proxy's HTTP and HTTPS ports")
		}
		return validatePaths(d.param(ParamServicePath), d.param(ParamPathType), d.PathType, d.ServicePath)
	case ModeTCP:
		if d.SrcPort == 0 {
			return paramErr(d.param(ParamSrcPort), "is required with reqMode tcp")
		}
		if len(d.ServicePath) > 0 {
			return paramErr(d.param(ParamServicePath), "has no meaning with reqMode tcp: a TCP port routes every connection to one service")
		}
		if len(d.ServiceDomain) > 0 {
			return paramErr(d.param(ParamServiceDomain), "has no meaning with reqMode tcp (reqMode sni routes TLS connections by name)")
		}
	case ModeSNI:
		if d.SrcPort == 0 {
			return paramErr(d.param(ParamSrcPort), "is required with reqMode sni")
		}
		if len(d.ServiceDomain) == 0 {
			return paramErr(d.param(ParamServiceDomain), "is required with reqMode sni: the names whose TLS connections reach the service")
		}
		if len(d.ServicePath) > 0 {
			return paramErr(d.param(ParamServicePath), "has no meaning with reqMode sni: TLS is passed through unopened")
		}
	}
	return nil
}

func validatePort(param string, p int) error {
	if p < 0 || p > 65535 {
		return paramErr(param, "%d is not a port number (1 to 65535)", p)
	}
	return nil
}

// Mode is the request mode of destination 0, http when unset.
func (r Route) Mode() ReqMode { return Dest{ReqMode: r.ReqMode}.Mode() }

// validatePaths checks one destination's paths and path type.
func validatePaths(pathParam, typeParam string, t PathType, paths []string) error {
	if !validPathType(t) {
		return paramErr(typeParam, "%s is not one of %s", quoteForMessage(string(t)), joinPathTypes())
	}
	if len(paths) == 0 {
		return paramErr(pathParam, "is required")
	}
	seen := map[string]bool{}
	for _, p := range paths {
		if err := validatePath(pathParam, t, p); err != nil {
			return err
		}
		if seen[p] {
			return paramErr(pathParam, "%q is listed twice", p)
		}
		seen[p] = true
	}
	return nil
}

// destKV writes an indexed destination's keys: path.N, domain.N, ...
func (d Dest) kv(kv map[string]string) {
	suffix := ""
	if d.Index > 0 {
		suffix = "." + strconv.Itoa(d.Index)
	}
	set := func(key, v string) {
		if v != "" {
			kv[key+suffix] = v
		}
	}
	set(KeyPath, strings.Join(d.ServicePath, ","))
	set(KeyDomain, strings.Join(d.ServiceDomain, ","))
	if d.Mode() == ModeHTTP && (d.Index > 0 || d.PathType != "") {
		set(KeyPathType, string(d.PathType))
	}
	if d.Port != 0 {
		set(KeyPort, strconv.Itoa(d.Port))
	}
	if d.SrcPort != 0 {
		set(KeySrcPort, strconv.Itoa(d.SrcPort))
	}
	if d.ReqMode != "" && d.ReqMode != ModeHTTP {
		set(KeyReqMode, string(d.ReqMode))
	}
}

// destsFromKV reads the indexed destinations' keys (path.1, port.1, ...).
func destsFromKV(serviceName string, kv map[string]string) ([]Dest, error) {
	q := url.Values{}
	names := map[string]string{KeyPath: ParamServicePath, KeyDomain: ParamServiceDomain, KeyPathType: ParamPathType,
		KeyPort: ParamPort, KeySrcPort: ParamSrcPort, KeyReqMode: ParamReqMode}
	for k, v := range kv {
		base, idx, ok := strings.Cut(k, ".")
		if !ok {
			continue
		}
		param, known := names[base]
		if !known {
			return nil, fmt.Errorf("route %s: key %s is not a destination key", serviceName, k)
		}
		if v = strings.TrimSpace(v); v != "" {
			q.Set(param+"."+idx, v)
		}
	}
	return parseIndexed(q)
}
