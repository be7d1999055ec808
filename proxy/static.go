package proxy

import (
	"fmt"

	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// SetStatic gives the controller the routes defined at start by DFP_SERVICE_* environment variables.
// They are served next to the routes of KV, are not written to KV, and cannot be changed or removed
// through the API: each replica defines them from its own environment. A route whose instances are
// listed is served with them; the others take their instances from the catalog. Call it before Load.
func (p *Proxy) SetStatic(routes []route.EnvRoute) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.static = make(map[string]route.EnvRoute, len(routes))
	for _, r := range routes {
		p.static[r.Route.ServiceName] = r
	}
}

// withStatic returns the routes of KV with the static routes added; a static route stands for a
// route of KV with the same name.
func (p *Proxy) withStatic(routes []route.Route) []route.Route {
	if len(p.static) == 0 {
		return routes
	}
	out := make([]route.Route, 0, len(routes)+len(p.static))
	for _, r := range routes {
		if s, ok := p.static[r.ServiceName]; ok {
			p.log.Warn("a route in KV has the name of a route defined by environment variables; serving the latter",
				"service", r.ServiceName, "vars", s.Vars)
			continue
		}
		out = append(out, r)
	}
	for _, s := range p.static {
		out = append(out, s.Route)
	}
	route.SortByName(out)
	return out
}

// staticInstances returns the instances listed for a static route.
func (p *Proxy) staticInstances(service string) ([]route.Instance, bool) {
	s, ok := p.static[service]
	if !ok || s.Instances == nil {
		return nil, false
	}
	return s.Instances, true
}

// refuseStatic refuses an API change of a route defined by environment variables.
func (p *Proxy) refuseStatic(service string) error {
	p.mu.Lock()
	s, ok := p.static[service]
	p.mu.Unlock()
	if !ok {
		return nil
	}
	return &route.ParamError{Param: route.ParamServiceName, Reason: fmt.Sprintf(
		"service %s is defined by this server's environment variables (%s); change them and restart the server", service, s.Vars)}
}
