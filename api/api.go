// Package api serves docker-flow-proxy's HTTP API, compatible with the original product's:
// /v1/docker-flow-proxy/reconfigure, /remove, /config, /health and /v1/test.
package api

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/proxy"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// Controller is what the API needs from the proxy.
type Controller interface {
	Reconfigure(ctx context.Context, r route.Route) ([]route.Instance, error)
	Remove(ctx context.Context, serviceName string) (bool, error)
	Config() []byte
	Reload(ctx context.Context, recreate bool) error
}

// Certs stores certificates and says which are served.
type Certs interface {
	// PutCert stores a certificate (chain and private key, PEM) under a file name ending in .pem
	// and returns once HAProxy serves it.
	PutCert(ctx context.Context, name string, pem []byte) error
	// CertNames lists the certificates' file names HAProxy serves.
	CertNames() ([]string, error)
}

// CertsResponse is the answer of GET /certs.
type CertsResponse struct {
	Status  string
	Message string
	Certs   []string
}

// Health reports whether the parts the proxy depends on are reachable.
type Health interface {
	HAProxyRunning() bool
	ConsulPing(ctx context.Context) error
	// ConsulFollowed is nil when every watch of Consul reads it.
	ConsulFollowed() error
}

// Response is the original product's answer to reconfigure and remove.
type Response struct {
	Status        string
	Message       string
	ServiceName   string
	ServiceColor  string
	ServicePath   []string
	ServiceDomain []string
	PathType      string
	SkipCheck     bool
	// The later versions' parameters, as the route holds them. Passwords are never echoed.
	ServiceDomainMatchAll bool     `json:",omitempty"`
	AclName               string   `json:",omitempty"`
	ReqPathSearch         string   `json:",omitempty"`
	ReqPathReplace        string   `json:",omitempty"`
	HttpsOnly             bool     `json:",omitempty"`
	RedirectWhenHttpProto bool     `json:",omitempty"`
	XForwardedProto       bool     `json:",omitempty"`
	AddHeader             []string `json:",omitempty"`
	SetHeader             []string `json:",omitempty"`
	OutboundHostname      string   `json:",omitempty"`
	TimeoutServer         int      `json:",omitempty"`
	TimeoutTunnel         int      `json:",omitempty"`
	ReqMode               string   `json:",omitempty"`
	Port                  int      `json:",omitempty"`
	SrcPort               int      `json:",omitempty"`
	TemplateFePath        string   `json:",omitempty"`
	TemplateBePath        string   `json:",omitempty"`
	// Destinations lists the indexed destinations (servicePath.1, port.1, ...).
	Destinations []Destination `json:",omitempty"`
	// Users names the users allowed, without their passwords.
	Users []string `json:",omitempty"`
	// Instances is how many instances the route balances over (reconfigure only).
	Instances int `json:",omitempty"`
}

// Destination is an indexed destination in a Response.
type Destination struct {
	Index         int
	ServicePath   []string `json:",omitempty"`
	ServiceDomain []string `json:",omitempty"`
	PathType      string   `json:",omitempty"`
	ReqMode       string   `json:",omitempty"`
	Port          int      `json:",omitempty"`
	SrcPort       int      `json:",omitempty"`
}

// Status values of Response.
const (
	StatusOK  = "OK"
	StatusNOK = "NOK"
)

// RequestTimeout bounds one reconfigure or remove, Consul and the reload included.
const RequestTimeout = 60 * time.Second

// Metrics counts the answers to reconfigure and remove requests and serves GET /metrics
// (*metrics.Metrics is one).
type Metrics interface {
	// Request records the answer to a request: op is "reconfigure" or "remove", err nil on success.
	Request(op string, err error)
	http.Handler
}

// Option changes what Handler serves.
type Option func(*handlers)

// WithMetrics counts requests in m and serves it on GET /metrics.
func WithMetrics(m Metrics) Option { return func(a *handlers) { a.metrics = m } }

// Handler returns the API's routes.
func Handler(c Controller, h Health, certs Certs, logger *slog.Logger, opts ...Option) http.Handler {
	if logger == nil {
		logger = slog.Default()
	}
	a := &handlers{c: c, h: h, certs: certs, log: logger}
	for _, o := range opts {
		o(a)
	}
	mux := http.NewServeMux()
	if a.metrics != nil {
		mux.Handle("GET /metrics", a.metrics)
	}
	mux.HandleFunc(pathReconfigure, a.reconfigure)
	mux.HandleFunc(pathRemove, a.remove)
	mux.HandleFunc("/v1/docker-flow-proxy/config", a.config)
	mux.HandleFunc("/v1/docker-flow-proxy/reload", a.reload)
	mux.HandleFunc("/v1/docker-flow-proxy/health", a.health)
	mux.HandleFunc("/v1/docker-flow-proxy/cert", a.putCert)
	mux.HandleFunc("/v1/docker-flow-proxy/certs", a.listCerts)
	mux.HandleFunc("/v1/test", a.test)
	mux.HandleFunc("/v1/docker-flow-proxy/test", a.test)
	return mux
}

type handlers struct {
	c       Controller
	h       Health
	certs   Certs
	log     *slog.Logger
	metrics Metrics
}

// Paths of the requests counted by Metrics.
const (
	pathReconfigure = "/v1/docker-flow-proxy/reconfigure"
	pathRemove      = "/v1/docker-flow-proxy/remove"
)

// observe records the answer to a reconfigure or remove request.
func (a *handlers) observe(req *http.Request, err error) {
	if a.metrics == nil {
		return
	}
	switch req.URL.Path {
	case pathReconfigure:
		a.metrics.Request("reconfigure", err)
	case pathRemove:
		a.metrics.Request("remove", err)
	}
}

func (a *handlers) reconfigure(w http.ResponseWriter, req *http.Request) {
	if !allowed(w, req) {
		return
	}
	q := req.URL.Query()
	resp := Response{ServiceName: q.Get(route.ParamServiceName)}
	r, err := route.FromQuery(q)
	if err != nil {
		a.fail(w, req, resp, err)
		return
	}
	resp = fromRoute(r)
	ctx, cancel := context.WithTimeout(req.Context(), RequestTimeout)
	defer cancel()
	if pem := q.Get(route.ParamServiceCert); pem != "" {
		// Validated by FromQuery; stored as PUT /cert stores it, before the route is served.
		if err := a.putCertErr(ctx, route.ServiceCertName(r.ServiceName), []byte(pem)); err != nil {
			a.fail(w, req, resp, err)
			return
		}
	}
	inst, err := a.c.Reconfigure(ctx, r)
	if err != nil {
		a.fail(w, req, resp, err)
		return
	}
	resp.Status = StatusOK
	resp.Instances = len(inst)
	if len(inst) == 0 {
		resp.Message = "no instance of " + r.ConsulService() + " is registered in Consul (or none is healthy) yet: " +
			"its paths answer 503 until one is"
	}
	a.observe(req, nil)
	writeJSON(w, http.StatusOK, resp)
}

func (a *handlers) remove(w http.ResponseWriter, req *http.Request) {
	if !allowed(w, req) {
		return
	}
	name := req.URL.Query().Get(route.ParamServiceName)
	resp := Response{ServiceName: name}
	if err := route.ValidateServiceName(name); err != nil {
		a.fail(w, req, resp, err)
		return
	}
	ctx, cancel := context.WithTimeout(req.Context(), RequestTimeout)
	defer cancel()
	existed, err := a.c.Remove(ctx, name)
	if err != nil {
		a.fail(w, req, resp, err)
		return
	}
	resp.Status = StatusOK
	if !existed {
		resp.Message = "no route for " + name + " was configured"
	}
	a.observe(req, nil)
	writeJSON(w, http.StatusOK, resp)
}

func (a *handlers) reload(w http.ResponseWriter, req *http.Request) {
	if !allowed(w, req) {
		return
	}
	recreate := false
	if v := req.URL.Query().Get("recreate"); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			a.fail(w, req, Response{}, &route.ParamError{Param: "recreate", Reason: strconv.Quote(v) + " is not a boolean (true or false)"})
			return
		}
		recreate = b
	}
	ctx, cancel := context.WithTimeout(req.Context(), RequestTimeout)
	defer cancel()
	if err := a.c.Reload(ctx, recreate); err != nil {
		a.fail(w, req, Response{}, err)
		return
	}
	msg := "the route table is served again"
	if recreate {
		msg = "the route table was rebuilt from Consul and is served"
	}
	writeJSON(w, http.StatusOK, Response{Status: StatusOK, Message: msg})
}

// putCert stores the request's body as a certificate: PUT /v1/docker-flow-proxy/cert?certName=<name>.
func (a *handlers) putCert(w http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodPut && req.Method != http.MethodPost {
		w.Header().Set("Allow", "PUT, POST")
		writeJSON(w, http.StatusMethodNotAllowed, Response{Status: StatusNOK, Message: "method " + req.Method + " is not allowed"})
		return
	}
	name, err := route.CertName(req.URL.Query().Get(route.ParamCertName))
	if err != nil {
		a.fail(w, req, Response{}, err)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, req.Body, route.MaxCertSize))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			err = &route.ParamError{Param: "body", Reason: "is larger than " + strconv.Itoa(route.MaxCertSize) + " bytes"}
		} else {
			err = &route.ParamError{Param: "body", Reason: "could not be read: " + err.Error()}
		}
		a.fail(w, req, Response{}, err)
		return
	}
	if err := route.ValidateCert("body", body); err != nil {
		a.fail(w, req, Response{}, err)
		return
	}
	ctx, cancel := context.WithTimeout(req.Context(), RequestTimeout)
	defer cancel()
	if err := a.putCertErr(ctx, name, body); err != nil {
		a.fail(w, req, Response{}, err)
		return
	}
	writeJSON(w, http.StatusOK, Response{Status: StatusOK, Message: "certificate " + name + " is stored and served"})
}

func (a *handlers) putCertErr(ctx context.Context, name string, pem []byte) error {
	if a.certs == nil {
		return errors.New("this proxy does not store certificates")
	}
	return a.certs.PutCert(ctx, name, pem)
}

// listCerts answers GET /v1/docker-flow-proxy/certs: the certificates' file names.
func (a *handlers) listCerts(w http.ResponseWriter, req *http.Request) {
	var names []string
	if a.certs != nil {
		var err error
		if names, err = a.certs.CertNames(); err != nil {
			a.log.Error("listing the certificates failed", "error", err)
			writeJSON(w, http.StatusInternalServerError, CertsResponse{Status: StatusNOK, Message: err.Error()})
			return
		}
	}
	if names == nil {
		names = []string{}
	}
	writeJSON(w, http.StatusOK, CertsResponse{Status: StatusOK, Certs: names})
}

func (a *handlers) config(w http.ResponseWriter, req *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = w.Write(a.c.Config())
}

// HealthResponse is the health endpoint's answer.
type HealthResponse struct {
	Status  string
	HAProxy string
	Consul  string
}

func (a *handlers) health(w http.ResponseWriter, req *http.Request) {
	ctx, cancel := context.WithTimeout(req.Context(), 5*time.Second)
	defer cancel()
	resp := HealthResponse{Status: StatusOK, HAProxy: "running", Consul: "reachable"}
	code := http.StatusOK
	if !a.h.HAProxyRunning() {
		resp.Status, resp.HAProxy, code = StatusNOK, "not running", http.StatusServiceUnavailable
	}
	if err := a.h.ConsulPing(ctx); err != nil {
		resp.Status, resp.Consul, code = StatusNOK, "unreachable: "+err.Error(), http.StatusServiceUnavailable
	} else if err := a.h.ConsulFollowed(); err != nil {
		resp.Status, resp.Consul, code = StatusNOK, "reachable, but a watch of it fails "+err.Error(), http.StatusServiceUnavailable
	}
	writeJSON(w, code, resp)
}

func (a *handlers) test(w http.ResponseWriter, req *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"Status": StatusOK})
}

func (a *handlers) fail(w http.ResponseWriter, req *http.Request, resp Response, err error) {
	a.observe(req, err)
	code := statusOf(err)
	resp.Status = StatusNOK
	resp.Message = err.Error()
	if code >= 500 {
		a.log.Error("request failed", "path", req.URL.Path, "service", resp.ServiceName, "status", code, "error", err)
	} else {
		a.log.Info("request refused", "path", req.URL.Path, "service", resp.ServiceName, "status", code, "error", err)
	}
	writeJSON(w, code, resp)
}

func statusOf(err error) int {
	var pe *route.ParamError
	switch {
	case errors.As(err, &pe), errors.Is(err, proxy.ErrRejected):
		return http.StatusBadRequest
	case errors.Is(err, proxy.ErrConsul):
		return http.StatusServiceUnavailable
	case errors.Is(err, context.DeadlineExceeded):
		return http.StatusGatewayTimeout
	default:
		return http.StatusInternalServerError
	}
}

func fromRoute(r route.Route) Response {
	resp := Response{ServiceName: r.ServiceName, ServiceColor: r.ServiceColor, ServicePath: r.ServicePath,
		ServiceDomain: r.ServiceDomain, PathType: string(r.PathType), SkipCheck: r.SkipCheck,
		ServiceDomainMatchAll: r.ServiceDomainMatchAll, AclName: r.ACLName,
		ReqPathSearch: r.ReqPathSearch, ReqPathReplace: r.ReqPathReplace,
		HttpsOnly: r.HTTPSOnly, RedirectWhenHttpProto: r.RedirectWhenHTTPProto, XForwardedProto: r.XForwardedProto,
		OutboundHostname: r.OutboundHostname, TimeoutServer: r.TimeoutServer, TimeoutTunnel: r.TimeoutTunnel,
		ReqMode: string(r.ReqMode), Port: r.Port, SrcPort: r.SrcPort,
		TemplateFePath: r.TemplateFePath, TemplateBePath: r.TemplateBePath}
	for _, d := range r.Dests {
		dest := Destination{Index: d.Index, ServicePath: d.ServicePath, ServiceDomain: d.ServiceDomain,
			ReqMode: string(d.ReqMode), Port: d.Port, SrcPort: d.SrcPort}
		if d.Mode() == route.ModeHTTP {
			dest.PathType = string(d.PathType)
		}
		resp.Destinations = append(resp.Destinations, dest)
	}
	for _, h := range r.AddHeader {
		resp.AddHeader = append(resp.AddHeader, h.Name+":"+h.Value)
	}
	for _, h := range r.SetHeader {
		resp.SetHeader = append(resp.SetHeader, h.Name+":"+h.Value)
	}
	for _, u := range r.Users {
		resp.Users = append(resp.Users, u.Name)
	}
	return resp
}

// allowed accepts GET, as the original's clients send, and POST.
func allowed(w http.ResponseWriter, req *http.Request) bool {
	if req.Method == http.MethodGet || req.Method == http.MethodPost {
		return true
	}
	w.Header().Set("Allow", "GET, POST")
	writeJSON(w, http.StatusMethodNotAllowed, Response{Status: StatusNOK, Message: "method " + req.Method + " is not allowed"})
	return false
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}
