package proxy

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/docker-flow-proxy/docker-flow-proxy/haproxy"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// Templates renders the custom templates of routes (templateFePath, templateBePath): files of the
// server's templates folder, in consul-template syntax.
type Templates interface {
	// Resolve checks that a template path names a file inside the folder and returns its path
	// relative to the folder; a refusal is a *route.ParamError naming param.
	Resolve(param, path string) (string, error)
	// Render renders the template at a resolved path against Consul.
	Render(ctx context.Context, rel string) (string, error)
}

// SetTemplates gives the controller the renderer of custom templates. Without one, a route that
// names a template is refused.
func (p *Proxy) SetTemplates(t Templates) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.templates = t
}

// backendOf reads the instances of every Consul service a route uses (those in known are read
// already) and renders its templates.
func (p *Proxy) backendOf(ctx context.Context, r route.Route, known map[string][]route.Instance) (route.Backend, error) {
	be := route.Backend{Route: r}
	listed, static := p.staticInstances(r.ServiceName)
	for _, svc := range r.ConsulServices() {
		inst, ok := known[svc]
		if static {
			inst, ok = listed, true // listed in the environment, not read from the catalog
		}
		if !ok {
			var err error
			inst, err = p.catalog.Instances(ctx, svc)
			if p.consul(OpReadInstances, err) != nil {
				return be, fmt.Errorf("read instances of %s: %w: %w", svc, ErrConsul, err)
			}
		}
		be.SetInstances(svc, inst)
	}
	return be, p.renderTemplates(ctx, &be)
}

// renderTemplates renders a route's custom templates into its backend. A template that cannot be
// read or rendered is a *route.ParamError naming its parameter: the request that names it is refused.
func (p *Proxy) renderTemplates(ctx context.Context, be *route.Backend) error {
	be.FrontendSnippet, be.BackendSnippet = "", ""
	for _, t := range []struct {
		param, path string
		out         *string
	}{
		{route.ParamTemplateFePath, be.Route.TemplateFePath, &be.FrontendSnippet},
		{route.ParamTemplateBePath, be.Route.TemplateBePath, &be.BackendSnippet},
	} {
		if t.path == "" {
			continue
		}
		if p.templates == nil {
			return &route.ParamError{Param: t.param, Reason: "this server has no templates folder (set TEMPLATES_DIR)"}
		}
		rel, err := p.templates.Resolve(t.param, t.path)
		if err != nil {
			return err
		}
		text, err := p.templates.Render(ctx, rel)
		if err != nil {
			var pe *route.ParamError
			var unavailable interface{ ConsulUnavailable() bool }
			switch {
			case errors.As(err, &pe), errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded) && ctx.Err() != nil:
				return err
			case errors.As(err, &unavailable) && unavailable.ConsulUnavailable():
				return fmt.Errorf("render %s: %w: %w", t.param, ErrConsul, err)
			}
			return &route.ParamError{Param: t.param, Reason: err.Error()}
		}
		if text == "" {
			return &route.ParamError{Param: t.param, Reason: fmt.Sprintf("%s renders to nothing", rel)}
		}
		*t.out = text
	}
	return nil
}

// refreshTemplatesLocked renders again the templates of the routes whose instances a batch
// changed: a template usually lists them.
func (p *Proxy) refreshTemplatesLocked(ctx context.Context, batch []*change, next map[string]route.Backend) {
	for _, c := range batch {
		be, ok := next[c.service]
		if !c.instancesOnly || !ok || (be.Route.TemplateFePath == "" && be.Route.TemplateBePath == "") {
			continue
		}
		fresh := be
		if err := p.renderTemplates(ctx, &fresh); err != nil {
			// The last rendering keeps serving; the next change of the service tries again.
			p.log.Warn("rendering a route's templates again failed; keeping the last rendering",
				"service", c.service, "error", err)
			continue
		}
		next[c.service] = fresh
	}
}

// sameInstances reports whether a route serves exactly inst as the instances of consulService.
func sameInstances(b route.Backend, consulService string, inst []route.Instance) bool {
	if consulService == b.Route.ConsulService() && !slices.Equal(b.Instances, inst) {
		return false
	}
	for _, d := range b.Route.Destinations() {
		if d.Port != 0 && b.Route.ConsulServiceFor(d) == consulService && !slices.Equal(b.PortInstances[d.Port], inst) {
			return false
		}
	}
	return true
}

// checkPortsLocked refuses a table whose TCP and SNI destinations clash over a source port.
func (p *Proxy) checkPortsLocked(next map[string]route.Backend) error {
	// Only routes that take a port can clash: the others are not handed over (at 10,000 routes,
	// copying them all took some 5 ms a change).
	var list []route.Backend
	for _, b := range next {
		if b.Route.TakesPort() {
			list = append(list, b)
		}
	}
	return haproxy.CheckPorts(p.settings, list)
}
