// Package route is the route model of docker-flow-proxy: what a reconfigure request asks for,
// its validation, and its layout in Consul KV. Everything here is pure: no I/O.
package route

import (
	"fmt"
	"net/url"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// PathType is the HAProxy ACL fetch that matches a route's paths.
type PathType string

// The path types the original product accepts.
const (
	PathBeg PathType = "path_beg"
	Path    PathType = "path"
	PathEnd PathType = "path_end"
	PathReg PathType = "path_reg"
	PathDir PathType = "path_dir"
)

// DefaultPathType is used when a request names none.
const DefaultPathType = PathBeg

var pathTypes = []PathType{PathBeg, Path, PathEnd, PathReg, PathDir}

// Route is one service's routing rule: which requests reach the instances of which Consul service.
type Route struct {
	// ServiceName names the route and the HAProxy backend (<ServiceName>-be).
	ServiceName string
	// ServiceColor selects the Consul service <ServiceName>-<ServiceColor> (blue-green deployment).
	ServiceColor string
	// ServicePath lists the paths (or patterns, for path_reg) that reach the service.
	ServicePath []string
	// ServiceDomain, when set, restricts the route to requests for these hosts.
	ServiceDomain []string
	// PathType is how ServicePath is matched.
	PathType PathType
	// SkipCheck drops HAProxy's health checks of the service's instances.
	SkipCheck bool
}

// Instance is one running copy of a service, as the Consul catalog knows it.
type Instance struct {
	Address string
	Port    int
}

// HostPort is the instance's address in HAProxy's server syntax.
func (i Instance) HostPort() string {
	host := i.Address
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	return host + ":" + strconv.Itoa(i.Port)
}

// Backend is a route with the instances it balances over: the unit the renderer works on.
type Backend struct {
	Route     Route
	Instances []Instance
}

// ConsulService is the name of the Consul service whose instances serve the route.
func (r Route) ConsulService() string {
	if r.ServiceColor != "" {
		return r.ServiceName + "-" + r.ServiceColor
	}
	return r.ServiceName
}

// BackendName is the route's HAProxy backend.
func (r Route) BackendName() string { return r.ServiceName + "-be" }

// Equal reports whether two routes ask for the same thing.
func (r Route) Equal(o Route) bool {
	return r.ServiceName == o.ServiceName && r.ServiceColor == o.ServiceColor &&
		r.PathType == o.PathType && r.SkipCheck == o.SkipCheck &&
		equalStrings(r.ServicePath, o.ServicePath) && equalStrings(r.ServiceDomain, o.ServiceDomain)
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// ParamError is a request parameter that cannot be accepted. The API answers it with HTTP 400.
type ParamError struct {
	Param  string
	Reason string
}

func (e *ParamError) Error() string { return fmt.Sprintf("parameter %s: %s", e.Param, e.Reason) }

func paramErr(param, format string, args ...any) error {
	return &ParamError{Param: param, Reason: fmt.Sprintf(format, args...)}
}

// Query parameter names, as the original product spells them.
const (
	ParamServiceName   = "serviceName"
	ParamServiceColor  = "serviceColor"
	ParamServicePath   = "servicePath"
	ParamServiceDomain = "serviceDomain"
	ParamPathType      = "pathType"
	ParamSkipCheck     = "skipCheck"
)

// Unsupported lists the original product's reconfigure parameters that this version does not
// implement. A request that sets one is refused rather than served with a different meaning.
var Unsupported = []string{
	"reqPathSearch", "reqPathReplace", "users", "usersPassEncrypted", "httpsOnly", "redirectWhenHttpProto",
	"xForwardedProto", "addHeader", "setHeader", "timeoutServer", "timeoutTunnel", "aclName",
	"serviceDomainMatchAll", "outboundHostname", "serviceCert", "reqMode", "srcPort", "port",
	"templateFePath", "templateBePath", "consulTemplateFePath", "consulTemplateBePath",
}

// FromQuery reads and validates a reconfigure request's query.
func FromQuery(q url.Values) (Route, error) {
	for _, p := range Unsupported {
		if q.Get(p) != "" {
			return Route{}, paramErr(p, "is not supported by this version of docker-flow-proxy")
		}
	}
	for k := range q {
		if i := strings.IndexByte(k, '.'); i > 0 && q.Get(k) != "" {
			return Route{}, paramErr(k, "indexed destinations are not supported by this version of docker-flow-proxy")
		}
	}
	for _, p := range []string{ParamServiceName, ParamServiceColor, ParamPathType, ParamSkipCheck} {
		if len(q[p]) > 1 {
			return Route{}, paramErr(p, "given %d times; give it once", len(q[p]))
		}
	}
	r := Route{
		ServiceName:   q.Get(ParamServiceName),
		ServiceColor:  q.Get(ParamServiceColor),
		ServicePath:   splitList(q[ParamServicePath]),
		ServiceDomain: splitList(q[ParamServiceDomain]),
		PathType:      PathType(q.Get(ParamPathType)),
	}
	if r.PathType == "" {
		r.PathType = DefaultPathType
	}
	if v := q.Get(ParamSkipCheck); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return Route{}, paramErr(ParamSkipCheck, "%q is not a boolean (true or false)", v)
		}
		r.SkipCheck = b
	}
	if err := r.Validate(); err != nil {
		return Route{}, err
	}
	return r, nil
}

// splitList joins repeated parameters and splits comma lists, keeping empty items so that
// validation can reject them.
func splitList(values []string) []string {
	var out []string
	for _, v := range values {
		out = append(out, strings.Split(v, ",")...)
	}
	return out
}

var (
	namePattern  = regexp.MustCompile(`^[A-Za-z0-9_.-]+$`)
	labelPattern = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$`)
	// A literal path: RFC 3986 path characters, without the ones HAProxy would read
	// ($ expands variables, quotes and backslashes are parsed, # starts a comment).
	literalPathPattern = regexp.MustCompile(`^/[A-Za-z0-9\-._~!&()*+;=:@%/]*$`)
	literalTailPattern = regexp.MustCompile(`^[A-Za-z0-9\-._~!&()*+;=:@%/]+$`)
	// A regular expression may also use the regex operators, still none of the characters above.
	regexPathPattern = regexp.MustCompile(`^[A-Za-z0-9\-._~!&()*+;=:@%/^\[\]{}|?<>]+$`)
)

// MaxNameLength bounds service names and colors: HAProxy names and Consul keys stay readable.
const MaxNameLength = 128

// MaxPathLength bounds one path.
const MaxPathLength = 1024

// Validate checks every field against what HAProxy and Consul can take safely.
func (r Route) Validate() error {
	if err := validateName(ParamServiceName, r.ServiceName, true); err != nil {
		return err
	}
	if err := validateName(ParamServiceColor, r.ServiceColor, false); err != nil {
		return err
	}
	if !validPathType(r.PathType) {
		return paramErr(ParamPathType, "%s is not one of %s", quoteForMessage(string(r.PathType)), joinPathTypes())
	}
	if len(r.ServicePath) == 0 {
		return paramErr(ParamServicePath, "is required")
	}
	seen := map[string]bool{}
	for _, p := range r.ServicePath {
		if err := validatePath(r.PathType, p); err != nil {
			return err
		}
		if seen[p] {
			return paramErr(ParamServicePath, "%q is listed twice", p)
		}
		seen[p] = true
	}
	for _, d := range r.ServiceDomain {
		if err := validateDomain(d); err != nil {
			return err
		}
	}
	return nil
}

// ValidateServiceName checks a service name on its own, as remove requests carry only that.
func ValidateServiceName(v string) error { return validateName(ParamServiceName, v, true) }

func validateName(param, v string, required bool) error {
	switch {
	case v == "" && required:
		return paramErr(param, "is required")
	case v == "":
		return nil
	case len(v) > MaxNameLength:
		return paramErr(param, "is longer than %d characters", MaxNameLength)
	case !namePattern.MatchString(v):
		return paramErr(param, "%s may contain only letters, digits, '_', '.' and '-'", quoteForMessage(v))
	case v == "." || v == "..":
		return paramErr(param, "%q is not a service name", v)
	}
	return nil
}

func validPathType(t PathType) bool {
	for _, p := range pathTypes {
		if p == t {
			return true
		}
	}
	return false
}

func joinPathTypes() string {
	s := make([]string, len(pathTypes))
	for i, p := range pathTypes {
		s[i] = string(p)
	}
	return strings.Join(s, ", ")
}

func validatePath(t PathType, p string) error {
	if p == "" {
		return paramErr(ParamServicePath, "has an empty path")
	}
	if len(p) > MaxPathLength {
		return paramErr(ParamServicePath, "has a path longer than %d characters", MaxPathLength)
	}
	checked := p
	if t == PathReg {
		// A regex may end with the '$' anchor: the renderer single-quotes regexes, and HAProxy
		// expands nothing inside single quotes. Anywhere else '$' is refused.
		checked = strings.TrimSuffix(p, "$")
	}
	if c, ok := forbiddenChar(checked); ok {
		return paramErr(ParamServicePath, "%s contains %s, which HAProxy would read as config syntax", quoteForMessage(p), c)
	}
	switch t {
	case PathReg:
		if !regexPathPattern.MatchString(checked) {
			return paramErr(ParamServicePath, "%s contains a character that is not allowed in a path pattern", quoteForMessage(p))
		}
		if _, err := regexp.Compile(p); err != nil {
			return paramErr(ParamServicePath, "%s is not a valid regular expression: %v", quoteForMessage(p), err)
		}
	case PathEnd:
		if !literalTailPattern.MatchString(p) {
			return paramErr(ParamServicePath, "%s contains a character that is not allowed in a URL path", quoteForMessage(p))
		}
	default:
		if !strings.HasPrefix(p, "/") {
			return paramErr(ParamServicePath, "%s must start with '/'", quoteForMessage(p))
		}
		if !literalPathPattern.MatchString(p) {
			return paramErr(ParamServicePath, "%s contains a character that is not allowed in a URL path", quoteForMessage(p))
		}
	}
	return nil
}

func validateDomain(d string) error {
	if d == "" {
		return paramErr(ParamServiceDomain, "has an empty domain")
	}
	if c, ok := forbiddenChar(d); ok {
		return paramErr(ParamServiceDomain, "%s contains %s", quoteForMessage(d), c)
	}
	if len(d) > 253 {
		return paramErr(ParamServiceDomain, "%q is longer than 253 characters", d)
	}
	for _, label := range strings.Split(d, ".") {
		if len(label) > 63 || !labelPattern.MatchString(label) {
			return paramErr(ParamServiceDomain, "%q is not a valid domain name", d)
		}
	}
	return nil
}

// forbiddenChar finds a character that HAProxy's config parser would interpret, and names it.
func forbiddenChar(s string) (string, bool) {
	for _, c := range s {
		switch {
		case c == '\n':
			return "a newline", true
		case c == '\r':
			return "a carriage return", true
		case c == ' ' || c == '\t':
			return "a space", true
		case c == '#':
			return "'#'", true
		case c == '"' || c == '\'' || c == '`':
			return "a quote", true
		case c == '\\':
			return "a backslash", true
		case c == '$':
			return "'$'", true
		case c < 0x20 || c == 0x7f:
			return "a control character", true
		case c > 0x7e:
			return "a non-ASCII character", true
		}
	}
	return "", false
}

// quoteForMessage quotes a value for an error message so that control characters stay visible.
func quoteForMessage(s string) string {
	if len(s) > 80 {
		s = s[:80] + "..."
	}
	return strconv.Quote(s)
}

// SortByName orders routes by service name, the order the renderer and the API use.
func SortByName(routes []Route) {
	sort.Slice(routes, func(i, j int) bool { return routes[i].ServiceName < routes[j].ServiceName })
}
