// Package route is the route model of docker-flow-proxy: what a reconfigure request asks for,
// its validation, and its layout in Consul KV. Everything here is pure: no I/O.
package route

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net/url"
	"regexp"
	"slices"
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

// Route is one service's routing rule: which requests reach the instances of which Consul service,
// and what happens to them on the way.
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

	// Matching.
	// ServiceDomainMatchAll makes ServiceDomain match its subdomains too (a.com matches x.a.com).
	ServiceDomainMatchAll bool
	// ACLName, when set, matches the route before every route without one, in ACLName order.
	ACLName string

	// Access: the client must use HTTPS, or give credentials.
	// HTTPSOnly redirects requests that did not come over TLS to https (301).
	HTTPSOnly bool
	// RedirectWhenHTTPProto redirects to https (301) the requests whose X-Forwarded-Proto is http,
	// for a TLS-terminating load balancer in front of the proxy.
	RedirectWhenHTTPProto bool
	// Users may use the route (HTTP basic auth). Without them, the server-wide users apply, if any.
	Users []User
	// UsersPassEncrypted says the users' passwords are SHA-512 crypt hashes ($6$...).
	UsersPassEncrypted bool

	// Rewriting: what the backend sees.
	// ReqPathSearch (a regular expression) and ReqPathReplace rewrite the request's path: the first
	// match of ReqPathSearch becomes ReqPathReplace (\1 to \6 refer to its groups), as sed's s/// does.
	ReqPathSearch  string
	ReqPathReplace string
	// OutboundHostname replaces the request's Host header.
	OutboundHostname string
	// XForwardedProto sets X-Forwarded-Proto to https or http, as the client connected.
	XForwardedProto bool
	// AddHeader lists headers added to the request, SetHeader headers that replace the request's own.
	AddHeader []Header
	SetHeader []Header

	// Timeouts, in seconds; 0 keeps the proxy-wide default.
	// TimeoutServer bounds how long the proxy waits for the service's answer.
	TimeoutServer int
	// TimeoutTunnel bounds how long a tunnel (WebSocket, CONNECT) may stay idle.
	TimeoutTunnel int

	// Destination 0's port, mode and source port (see Dest); ServicePath, ServiceDomain and
	// PathType above are its paths and hosts.
	Port    int
	ReqMode ReqMode
	SrcPort int
	// Dests are the indexed destinations (servicePath.1, port.1, ...), in index order.
	Dests []Dest

	// Custom templates: files in the server's templates folder, in consul-template syntax, rendered
	// against Consul. TemplateFePath replaces the route's generated frontend lines (its ACLs and
	// use_backend), TemplateBePath its generated backend section. Paths are relative to the folder.
	TemplateFePath string
	TemplateBePath string
}

// User is a user name and password of HTTP basic auth.
type User struct {
	Name     string
	Password string
}

// Hashed reports whether the password is a SHA-512 crypt hash rather than the password itself.
// Validation keeps '$' out of clear passwords, so the shape tells the two apart.
func (u User) Hashed() bool { return sha512CryptPattern.MatchString(u.Password) }

// Header is a request header the proxy adds or sets.
type Header struct {
	Name  string
	Value string
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
	Route Route
	// Instances are those of Route.ConsulService().
	Instances []Instance
	// PortInstances are those of the destinations that name a port (Route.ConsulServiceFor), by port.
	PortInstances map[int][]Instance
	// FrontendSnippet and BackendSnippet are the route's custom templates, rendered; they replace
	// the route's generated frontend lines and its generated backend.
	FrontendSnippet string
	BackendSnippet  string
}

// InstancesFor returns the instances that serve a destination.
func (b Backend) InstancesFor(d Dest) []Instance {
	if d.Port != 0 {
		return b.PortInstances[d.Port]
	}
	return b.Instances
}

// SetInstances records the instances of one of the route's Consul services. The map of port
// instances is copied, never changed in place: copies of a Backend stay independent.
func (b *Backend) SetInstances(consulService string, inst []Instance) {
	if consulService == b.Route.ConsulService() {
		b.Instances = inst
	}
	copied := false
	for _, d := range b.Route.Destinations() {
		if d.Port == 0 || b.Route.ConsulServiceFor(d) != consulService {
			continue
		}
		if !copied {
			m := make(map[int][]Instance, len(b.PortInstances)+1)
			for k, v := range b.PortInstances {
				m[k] = v
			}
			b.PortInstances, copied = m, true
		}
		b.PortInstances[d.Port] = inst
	}
}

// InstanceCount is the number of instances over all the route's Consul services.
func (b Backend) InstanceCount() int {
	n := len(b.Instances)
	for _, inst := range b.PortInstances {
		n += len(inst)
	}
	return n
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

// Clone returns a copy of the route that shares no slice with it.
func (r Route) Clone() Route {
	r.ServicePath = slices.Clone(r.ServicePath)
	r.ServiceDomain = slices.Clone(r.ServiceDomain)
	r.Users = slices.Clone(r.Users)
	r.AddHeader = slices.Clone(r.AddHeader)
	r.SetHeader = slices.Clone(r.SetHeader)
	if r.Dests != nil {
		dests := make([]Dest, len(r.Dests))
		for i, d := range r.Dests {
			d.ServicePath = slices.Clone(d.ServicePath)
			d.ServiceDomain = slices.Clone(d.ServiceDomain)
			dests[i] = d
		}
		r.Dests = dests
	}
	return r
}

// Equal reports whether two routes ask for the same thing.
func (r Route) Equal(o Route) bool {
	return r.ServiceName == o.ServiceName && r.ServiceColor == o.ServiceColor &&
		r.PathType == o.PathType && r.SkipCheck == o.SkipCheck &&
		slices.Equal(r.ServicePath, o.ServicePath) && slices.Equal(r.ServiceDomain, o.ServiceDomain) &&
		r.ServiceDomainMatchAll == o.ServiceDomainMatchAll && r.ACLName == o.ACLName &&
		r.HTTPSOnly == o.HTTPSOnly && r.RedirectWhenHTTPProto == o.RedirectWhenHTTPProto &&
		slices.Equal(r.Users, o.Users) && r.UsersPassEncrypted == o.UsersPassEncrypted &&
		r.ReqPathSearch == o.ReqPathSearch && r.ReqPathReplace == o.ReqPathReplace &&
		r.OutboundHostname == o.OutboundHostname && r.XForwardedProto == o.XForwardedProto &&
		slices.Equal(r.AddHeader, o.AddHeader) && slices.Equal(r.SetHeader, o.SetHeader) &&
		r.TimeoutServer == o.TimeoutServer && r.TimeoutTunnel == o.TimeoutTunnel &&
		r.Port == o.Port && r.Mode() == o.Mode() && r.SrcPort == o.SrcPort &&
		slices.EqualFunc(r.Dests, o.Dests, Dest.equal) &&
		r.TemplateFePath == o.TemplateFePath && r.TemplateBePath == o.TemplateBePath
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

	ParamServiceDomainMatchAll = "serviceDomainMatchAll"
	ParamACLName               = "aclName"
	ParamHTTPSOnly             = "httpsOnly"
	ParamRedirectWhenHTTPProto = "redirectWhenHttpProto"
	ParamUsers                 = "users"
	ParamUsersPassEncrypted    = "usersPassEncrypted"
	ParamReqPathSearch         = "reqPathSearch"
	ParamReqPathReplace        = "reqPathReplace"
	ParamOutboundHostname      = "outboundHostname"
	ParamXForwardedProto       = "xForwardedProto"
	ParamAddHeader             = "addHeader"
	ParamSetHeader             = "setHeader"
	ParamTimeoutServer         = "timeoutServer"
	ParamTimeoutTunnel         = "timeoutTunnel"

	ParamTemplateFePath       = "templateFePath"
	ParamTemplateBePath       = "templateBePath"
	ParamConsulTemplateFePath = "consulTemplateFePath"
	ParamConsulTemplateBePath = "consulTemplateBePath"
)

// listParams may be repeated or given as comma lists; scalarParams are given once.
var (
	listParams   = []string{ParamServicePath, ParamServiceDomain, ParamUsers, ParamAddHeader, ParamSetHeader}
	scalarParams = []string{
		ParamServiceName, ParamServiceColor, ParamPathType, ParamSkipCheck, ParamServiceDomainMatchAll, ParamACLName,
		ParamHTTPSOnly, ParamRedirectWhenHTTPProto, ParamUsersPassEncrypted, ParamReqPathSearch, ParamReqPathReplace,
		ParamOutboundHostname, ParamXForwardedProto, ParamTimeoutServer, ParamTimeoutTunnel,
		ParamPort, ParamReqMode, ParamSrcPort,
		ParamTemplateFePath, ParamTemplateBePath, ParamConsulTemplateFePath, ParamConsulTemplateBePath,
	}
)

// FromQuery reads and validates a reconfigure request's query.
func FromQuery(q url.Values) (Route, error) {
	if len(q[ParamServiceCert]) > 1 {
		return Route{}, paramErr(ParamServiceCert, "given %d times; give it once", len(q[ParamServiceCert]))
	}
	if c := q.Get(ParamServiceCert); c != "" {
		// Stored apart from the route (see ServiceCertName); validated here so that a bad PEM is a 400.
		if err := ValidateCert(ParamServiceCert, []byte(c)); err != nil {
			return Route{}, err
		}
	}
	for _, p := range scalarParams {
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
	var err error
	if r.Dests, err = parseIndexed(q); err != nil {
		return Route{}, err
	}
	if err := r.parseTemplates(q.Get); err != nil {
		return Route{}, err
	}
	err = r.parseOptions(func(param string) string {
		if slices.Contains(listParams, param) {
			return strings.Join(q[param], ",")
		}
		return q.Get(param)
	})
	if err != nil {
		return Route{}, err
	}
	if err := r.Validate(); err != nil {
		return Route{}, err
	}
	return r, nil
}

// parseOptions reads the optional parameters from their text form, looked up by parameter name:
// the query's values or the KV keys. An empty value is an unset parameter. Validate checks them.
func (r *Route) parseOptions(value func(param string) string) error {
	bools := []struct {
		param string
		field *bool
	}{
		{ParamServiceDomainMatchAll, &r.ServiceDomainMatchAll},
		{ParamHTTPSOnly, &r.HTTPSOnly},
		{ParamRedirectWhenHTTPProto, &r.RedirectWhenHTTPProto},
		{ParamUsersPassEncrypted, &r.UsersPassEncrypted},
		{ParamXForwardedProto, &r.XForwardedProto},
	}
	var err error
	for _, b := range bools {
		if *b.field, err = parseBool(b.param, value(b.param)); err != nil {
			return err
		}
	}
	if r.TimeoutServer, err = parseSeconds(ParamTimeoutServer, value(ParamTimeoutServer)); err != nil {
		return err
	}
	if r.TimeoutTunnel, err = parseSeconds(ParamTimeoutTunnel, value(ParamTimeoutTunnel)); err != nil {
		return err
	}
	if r.Port, err = parsePort(ParamPort, value(ParamPort)); err != nil {
		return err
	}
	if r.SrcPort, err = parsePort(ParamSrcPort, value(ParamSrcPort)); err != nil {
		return err
	}
	r.ReqMode = ReqMode(value(ParamReqMode))
	r.ACLName = value(ParamACLName)
	r.ReqPathSearch = value(ParamReqPathSearch)
	r.ReqPathReplace = value(ParamReqPathReplace)
	r.OutboundHostname = value(ParamOutboundHostname)
	if r.Users, err = splitUsers(ParamUsers, value(ParamUsers)); err != nil {
		return err
	}
	if r.AddHeader, err = splitHeaders(ParamAddHeader, value(ParamAddHeader)); err != nil {
		return err
	}
	if r.SetHeader, err = splitHeaders(ParamSetHeader, value(ParamSetHeader)); err != nil {
		return err
	}
	return nil
}

func parseBool(param, v string) (bool, error) {
	if v == "" {
		return false, nil
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		return false, paramErr(param, "%s is not a boolean (true or false)", quoteForMessage(v))
	}
	return b, nil
}

// MaxTimeout bounds timeoutServer and timeoutTunnel, in seconds (one day).
const MaxTimeout = 86400

func parseSeconds(param, v string) (int, error) {
	if v == "" {
		return 0, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 || n > MaxTimeout || v[0] == '+' {
		return 0, paramErr(param, "%s is not a number of seconds from 1 to %d", quoteForMessage(v), MaxTimeout)
	}
	return n, nil
}

// splitUsers splits a comma list of user:password (the password may hold ':').
func splitUsers(param, list string) ([]User, error) {
	if list == "" {
		return nil, nil
	}
	var out []User
	for _, item := range strings.Split(list, ",") {
		name, pass, ok := strings.Cut(item, ":")
		if !ok {
			// The item may be a password: it is not repeated in the message.
			return nil, paramErr(param, "has an item that is not user:password")
		}
		out = append(out, User{Name: name, Password: pass})
	}
	return out, nil
}

// ParseUsers reads the server-wide users (USERS): a comma list of user:password. A password in the
// form of a SHA-512 crypt hash ($6$...) is taken as a hash, any other as the password itself.
func ParseUsers(list string) ([]User, error) {
	users, err := splitUsers("USERS", list)
	if err != nil {
		return nil, err
	}
	for _, u := range users {
		if err := validateUser("USERS", u, u.Hashed()); err != nil {
			return nil, err
		}
	}
	if err := checkUsersList("USERS", users); err != nil {
		return nil, err
	}
	return users, nil
}

// splitHeaders splits a comma list of headers, each "Name:value" (or "Name value", the original's
// form). Spaces around the name and the value are dropped.
func splitHeaders(param, list string) ([]Header, error) {
	if list == "" {
		return nil, nil
	}
	var out []Header
	for _, item := range strings.Split(list, ",") {
		item = strings.Trim(item, " ")
		name, value, ok := strings.Cut(item, ":")
		if !ok || !headerNamePattern.MatchString(strings.Trim(name, " ")) && strings.Contains(item, " ") {
			name, value, ok = strings.Cut(item, " ")
		}
		if !ok {
			return nil, paramErr(param, "%s is not Name:value", quoteForMessage(item))
		}
		out = append(out, Header{Name: strings.Trim(name, " "), Value: strings.Trim(value, " ")})
	}
	return out, nil
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
	if err := r.validateDests(); err != nil {
		return err
	}
	if err := r.validateTemplates(); err != nil {
		return err
	}
	return r.validateOptions()
}

// validateOptions checks the optional parameters.
func (r Route) validateOptions() error {
	if r.ServiceDomainMatchAll && !r.hasDomain() {
		return paramErr(ParamServiceDomainMatchAll, "needs %s", ParamServiceDomain)
	}
	if r.ACLName != "" {
		if err := validateName(ParamACLName, r.ACLName, false); err != nil {
			return err
		}
	}
	if err := r.validateUsers(); err != nil {
		return err
	}
	if err := validateRewrite(r.ReqPathSearch, r.ReqPathReplace); err != nil {
		return err
	}
	if r.OutboundHostname != "" {
		if err := validateDomain(ParamOutboundHostname, r.OutboundHostname); err != nil {
			return err
		}
	}
	if err := validateHeaders(ParamAddHeader, r.AddHeader); err != nil {
		return err
	}
	if err := validateHeaders(ParamSetHeader, r.SetHeader); err != nil {
		return err
	}
	if err := validateSeconds(ParamTimeoutServer, r.TimeoutServer); err != nil {
		return err
	}
	return validateSeconds(ParamTimeoutTunnel, r.TimeoutTunnel)
}

// validateSeconds checks a timeout: 0 (unset) or 1 to MaxTimeout seconds.
func validateSeconds(param string, v int) error {
	if v < 0 || v > MaxTimeout {
		return paramErr(param, "%d is not a number of seconds from 1 to %d", v, MaxTimeout)
	}
	return nil
}

// MaxUsers bounds the users of one route, MaxHeaders the headers of one list.
const (
	MaxUsers   = 100
	MaxHeaders = 32
)

var (
	userNamePattern = regexp.MustCompile(`^[A-Za-z0-9_.@-]+$`)
	// A clear password: printable ASCII without space, quotes, backslash, '#', '$' or ','.
	clearPasswordPattern = regexp.MustCompile(`^[A-Za-z0-9!%&()*+\-./:;<=>?@\[\]^_{|}~]+$`)
	// A SHA-512 crypt hash: $6$, optional rounds, a salt of up to 16 characters, 86 characters of hash.
	sha512CryptPattern = regexp.MustCompile(`^\$6\$(rounds=[1-9][0-9]{3,8}\$)?[./0-9A-Za-z]{1,16}\$[./0-9A-Za-z]{86}$`)
)

func (r Route) validateUsers() error {
	if r.UsersPassEncrypted && len(r.Users) == 0 {
		return paramErr(ParamUsersPassEncrypted, "needs %s", ParamUsers)
	}
	for _, u := range r.Users {
		if err := validateUser(ParamUsers, u, r.UsersPassEncrypted); err != nil {
			return err
		}
	}
	return checkUsersList(ParamUsers, r.Users)
}

// validateUser checks a user name and password. Messages never repeat a password.
func validateUser(param string, u User, hashed bool) error {
	switch {
	case u.Name == "":
		return paramErr(param, "has a user without a name")
	case len(u.Name) > 64:
		return paramErr(param, "has a user name longer than 64 characters")
	case !userNamePattern.MatchString(u.Name):
		return paramErr(param, "user name %s may contain only letters, digits, '_', '.', '@' and '-'", quoteForMessage(u.Name))
	case u.Password == "":
		return paramErr(param, "user %s has an empty password", u.Name)
	case hashed && !sha512CryptPattern.MatchString(u.Password):
		return paramErr(param, "the password of user %s is not a SHA-512 crypt hash ($6$salt$hash, as openssl passwd -6 makes)", u.Name)
	case !hashed && len(u.Password) > 128:
		return paramErr(param, "the password of user %s is longer than 128 characters", u.Name)
	case !hashed && !clearPasswordPattern.MatchString(u.Password):
		hint := ""
		if param == ParamUsers {
			hint = fmt.Sprintf(" (with %s=true it is a SHA-512 crypt hash)", ParamUsersPassEncrypted)
		}
		return paramErr(param, "the password of user %s may not contain %s%s", u.Name, badChar(u.Password, clearPasswordPattern), hint)
	}
	return nil
}

func checkUsersList(param string, users []User) error {
	if len(users) > MaxUsers {
		return paramErr(param, "lists more than %d users", MaxUsers)
	}
	seen := map[string]bool{}
	for _, u := range users {
		if seen[u.Name] {
			return paramErr(param, "lists user %s twice", u.Name)
		}
		seen[u.Name] = true
	}
	return nil
}

var (
	// A path regex: URL path characters, the regex operators, '$' and '\\' (the renderer single-quotes
	// it, and HAProxy reads nothing inside single quotes); no quote, space or '#'.
	pathSearchPattern = regexp.MustCompile(`^[A-Za-z0-9\-._~!&()*+,;=:@%/^\[\]{}|?<>$\\]+$`)
	// A replacement: URL path characters and \N back-references.
	pathReplacePattern = regexp.MustCompile(`^([A-Za-z0-9\-._~!&()*+,;=:@%/]|\\[0-9])+$`)
	backReference      = regexp.MustCompile(`\\([0-9])`)
)

// MaxPathSearchGroups bounds the groups of reqPathSearch: HAProxy's back-references go from \0 to
// \9, and the renderer needs three of them around the search.
const MaxPathSearchGroups = 6

func validateRewrite(search, replace string) error {
	switch {
	case search == "" && replace == "":
		return nil
	case search == "":
		return paramErr(ParamReqPathSearch, "is required with %s", ParamReqPathReplace)
	case replace == "":
		return paramErr(ParamReqPathReplace, "is required with %s", ParamReqPathSearch)
	}
	if len(search) > MaxPathLength {
		return paramErr(ParamReqPathSearch, "is longer than %d characters", MaxPathLength)
	}
	if !pathSearchPattern.MatchString(search) {
		return paramErr(ParamReqPathSearch, "%s contains %s, which is not allowed", quoteForMessage(search), badChar(search, pathSearchPattern))
	}
	re, err := regexp.Compile(search)
	if err != nil {
		return paramErr(ParamReqPathSearch, "%s is not a valid regular expression: %v", quoteForMessage(search), err)
	}
	if len(replace) > MaxPathLength {
		return paramErr(ParamReqPathReplace, "is longer than %d characters", MaxPathLength)
	}
	if !pathReplacePattern.MatchString(replace) {
		return paramErr(ParamReqPathReplace, "%s may contain only URL path characters and \\1 to \\9 back-references", quoteForMessage(replace))
	}
	if re.NumSubexp() > MaxPathSearchGroups {
		return paramErr(ParamReqPathSearch, "has %d groups; at most %d are allowed", re.NumSubexp(), MaxPathSearchGroups)
	}
	for _, m := range backReference.FindAllStringSubmatch(replace, -1) {
		if n, _ := strconv.Atoi(m[1]); n > re.NumSubexp() {
			return paramErr(ParamReqPathReplace, "refers to group %d, but %s has %d", n, ParamReqPathSearch, re.NumSubexp())
		}
	}
	return nil
}

var (
	// Header names: HTTP token characters, without the ones HAProxy's parser reads ('#', '$', quotes, '%').
	headerNamePattern = regexp.MustCompile(`^[A-Za-z0-9!&*+.^_|~-]+$`)
	// Header values: printable ASCII and spaces (the renderer single-quotes them), without '%' (a
	// log-format expression), quotes, backslash, '$' or '#'.
	headerValuePattern = regexp.MustCompile(`^[A-Za-z0-9 !&()*+,\-./:;<=>?@\[\]^_{|}~]+$`)
)

// reservedHeaders frame the request or name its host: a header list may not add or replace them.
var reservedHeaders = []string{"host", "content-length", "transfer-encoding", "connection"}

func validateHeaders(param string, hs []Header) error {
	if len(hs) > MaxHeaders {
		return paramErr(param, "lists more than %d headers", MaxHeaders)
	}
	for _, h := range hs {
		switch {
		case h.Name == "":
			return paramErr(param, "has a header without a name")
		case len(h.Name) > 128:
			return paramErr(param, "has a header name longer than 128 characters")
		case !headerNamePattern.MatchString(h.Name):
			return paramErr(param, "header name %s may contain only letters, digits and !&*+.^_|~-", quoteForMessage(h.Name))
		case slices.Contains(reservedHeaders, strings.ToLower(h.Name)):
			return paramErr(param, "may not change the %s header (use %s for Host)", h.Name, ParamOutboundHostname)
		case h.Value == "":
			return paramErr(param, "header %s has no value", h.Name)
		case len(h.Value) > 1024:
			return paramErr(param, "the value of header %s is longer than 1024 characters", h.Name)
		case strings.TrimSpace(h.Value) != h.Value:
			return paramErr(param, "the value of header %s starts or ends with a space", h.Name)
		case !headerValuePattern.MatchString(h.Value):
			return paramErr(param, "the value of header %s contains %s, which is not allowed", h.Name, badChar(h.Value, headerValuePattern))
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

func validatePath(param string, t PathType, p string) error {
	if p == "" {
		return paramErr(param, "has an empty path")
	}
	if len(p) > MaxPathLength {
		return paramErr(param, "has a path longer than %d characters", MaxPathLength)
	}
	checked := p
	if t == PathReg {
		// A regex may end with the '$' anchor: the renderer single-quotes regexes, and HAProxy
		// expands nothing inside single quotes. Anywhere else '$' is refused.
		checked = strings.TrimSuffix(p, "$")
	}
	if c, ok := forbiddenChar(checked); ok {
		return paramErr(param, "%s contains %s, which HAProxy would read as config syntax", quoteForMessage(p), c)
	}
	switch t {
	case PathReg:
		if !regexPathPattern.MatchString(checked) {
			return paramErr(param, "%s contains a character that is not allowed in a path pattern", quoteForMessage(p))
		}
		if _, err := regexp.Compile(p); err != nil {
			return paramErr(param, "%s is not a valid regular expression: %v", quoteForMessage(p), err)
		}
	case PathEnd:
		if !literalTailPattern.MatchString(p) {
			return paramErr(param, "%s contains a character that is not allowed in a URL path", quoteForMessage(p))
		}
	default:
		if !strings.HasPrefix(p, "/") {
			return paramErr(param, "%s must start with '/'", quoteForMessage(p))
		}
		if !literalPathPattern.MatchString(p) {
			return paramErr(param, "%s contains a character that is not allowed in a URL path", quoteForMessage(p))
		}
	}
	return nil
}

func validateDomain(param, d string) error {
	if d == "" {
		return paramErr(param, "has an empty domain")
	}
	if c, ok := forbiddenChar(d); ok {
		return paramErr(param, "%s contains %s", quoteForMessage(d), c)
	}
	if len(d) > 253 {
		return paramErr(param, "%q is longer than 253 characters", d)
	}
	for _, label := range strings.Split(d, ".") {
		if len(label) > 63 || !labelPattern.MatchString(label) {
			return paramErr(param, "%q is not a valid domain name", d)
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

// badChar names the first character of s that pattern, a character class, refuses.
func badChar(s string, pattern *regexp.Regexp) string {
	for _, c := range s {
		if !pattern.MatchString(string(c)) {
			if name, ok := forbiddenChar(string(c)); ok {
				return name
			}
			return strconv.QuoteRune(c)
		}
	}
	return "a character that is not allowed"
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

// Certificates: PUT /cert and reconfigure's serviceCert. A certificate is a PEM file holding the
// certificate chain and its private key; HAProxy serves every one of them and picks by SNI.
const (
	// ParamServiceCert is reconfigure's parameter: the service's PEM, stored as <serviceName>.pem.
	// It is not part of the route (nor of its KV folder): it is stored with the certificates.
	ParamServiceCert = "serviceCert"
	// ParamCertName names the certificate of PUT /cert.
	ParamCertName = "certName"
	// MaxCertSize bounds a PEM's size.
	MaxCertSize = 1 << 20
	// certNameMax bounds a certificate's file name, ".pem" included.
	certNameMax = 132
)

var certNameRe = regexp.MustCompile(`^[A-Za-z0-9_.-]+$`)

// CertName validates the name of a certificate and returns its file name: the name with ".pem"
// appended unless it ends with it. A refusal is a *ParamError naming certName.
func CertName(name string) (string, error) {
	switch {
	case name == "":
		return "", paramErr(ParamCertName, "is required")
	case !certNameRe.MatchString(name):
		return "", paramErr(ParamCertName, "%q may use only letters, digits, '_', '.' and '-'", name)
	case strings.HasPrefix(name, "."):
		return "", paramErr(ParamCertName, "%q may not start with '.'", name)
	}
	if !strings.HasSuffix(name, ".pem") {
		name += ".pem"
	}
	if len(name) > certNameMax {
		return "", paramErr(ParamCertName, "is longer than %d characters", certNameMax)
	}
	return name, nil
}

// ServiceCertName is the file name of the certificate given with a route's serviceCert.
func ServiceCertName(serviceName string) string { return serviceName + ".pem" }

// ValidateCert checks that data is a PEM file that HAProxy can serve: at most MaxCertSize bytes, at
// least one CERTIFICATE block, every one of them a valid X.509 certificate, and a private key that
// matches the first certificate. A refusal is a *ParamError naming param.
func ValidateCert(param string, data []byte) error {
	if len(data) == 0 {
		return paramErr(param, "is empty: give the certificate chain and its private key as PEM")
	}
	if len(data) > MaxCertSize {
		return paramErr(param, "is larger than %d bytes", MaxCertSize)
	}
	certs := 0
	for rest := data; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		certs++
		if _, err := x509.ParseCertificate(b.Bytes); err != nil {
			return paramErr(param, "certificate %d is not valid: %v", certs, err)
		}
	}
	if certs == 0 {
		return paramErr(param, "holds no PEM CERTIFICATE block")
	}
	if _, err := tls.X509KeyPair(data, data); err != nil {
		return paramErr(param, "holds no private key that matches the certificate: %v", err)
	}
	return nil
}
