package route

import (
	"fmt"
	"strconv"
	"strings"
)

// KV key names under <instance>/<service>/, the original product's readable layout.
const (
	KeyPath      = "path"
	KeyColor     = "color"
	KeyDomain    = "domain"
	KeyPathType  = "pathtype"
	KeySkipCheck = "skipcheck"

	KeyServiceDomainMatchAll = "servicedomainmatchall"
	KeyACLName               = "aclname"
	KeyHTTPSOnly             = "httpsonly"
	KeyRedirectWhenHTTPProto = "redirectwhenhttpproto"
	KeyUsers                 = "users"
	KeyUsersPassEncrypted    = "userspassencrypted"
	KeyReqPathSearch         = "reqpathsearch"
	KeyReqPathReplace        = "reqpathreplace"
	KeyOutboundHostname      = "outboundhostname"
	KeyXForwardedProto       = "xforwardedproto"
	KeyAddHeader             = "addheader"
	KeySetHeader             = "setheader"
	KeyTimeoutServer         = "timeoutserver"
	KeyTimeoutTunnel         = "timeouttunnel"

	KeyPort    = "port"
	KeySrcPort = "srcport"
	KeyReqMode = "reqmode"

	KeyTemplateFePath       = "templatefepath"
	KeyTemplateBePath       = "templatebepath"
	KeyConsulTemplateFePath = "consultemplatefepath"
	KeyConsulTemplateBePath = "consultemplatebepath"
)

// optionKeys maps the optional parameters to their KV keys: the parameter's name in lower case.
var optionKeys = map[string]string{
	ParamServiceDomainMatchAll: KeyServiceDomainMatchAll,
	ParamACLName:               KeyACLName,
	ParamHTTPSOnly:             KeyHTTPSOnly,
	ParamRedirectWhenHTTPProto: KeyRedirectWhenHTTPProto,
	ParamUsers:                 KeyUsers,
	ParamUsersPassEncrypted:    KeyUsersPassEncrypted,
	ParamReqPathSearch:         KeyReqPathSearch,
	ParamReqPathReplace:        KeyReqPathReplace,
	ParamOutboundHostname:      KeyOutboundHostname,
	ParamXForwardedProto:       KeyXForwardedProto,
	ParamAddHeader:             KeyAddHeader,
	ParamSetHeader:             KeySetHeader,
	ParamTimeoutServer:         KeyTimeoutServer,
	ParamTimeoutTunnel:         KeyTimeoutTunnel,
	ParamPort:                  KeyPort,
	ParamSrcPort:               KeySrcPort,
	ParamReqMode:               KeyReqMode,
}

// templateKeys maps the template parameters to their KV keys; the original product wrote the
// consulTemplate ones.
var templateKeys = map[string]string{
	ParamTemplateFePath:       KeyTemplateFePath,
	ParamTemplateBePath:       KeyTemplateBePath,
	ParamConsulTemplateFePath: KeyConsulTemplateFePath,
	ParamConsulTemplateBePath: KeyConsulTemplateBePath,
}

// KV returns the route as key/value pairs, one readable key per field, relative to its service folder.
// Optional fields that are unset are left out.
func (r Route) KV() map[string]string {
	kv := map[string]string{
		KeyPathType:  string(r.PathType),
		KeySkipCheck: strconv.FormatBool(r.SkipCheck),
	}
	if r.hasDest0() {
		r.Destinations()[0].kv(kv)
	}
	for _, d := range r.Dests {
		d.kv(kv)
	}
	set := func(key, v string) {
		if v != "" {
			kv[key] = v
		}
	}
	setBool := func(key string, b bool) {
		if b {
			kv[key] = "true"
		}
	}
	setSeconds := func(key string, n int) {
		if n != 0 {
			kv[key] = strconv.Itoa(n)
		}
	}
	set(KeyColor, r.ServiceColor)
	set(KeyTemplateFePath, r.TemplateFePath)
	set(KeyTemplateBePath, r.TemplateBePath)
	setBool(KeyServiceDomainMatchAll, r.ServiceDomainMatchAll)
	set(KeyACLName, r.ACLName)
	setBool(KeyHTTPSOnly, r.HTTPSOnly)
	setBool(KeyRedirectWhenHTTPProto, r.RedirectWhenHTTPProto)
	set(KeyUsers, joinUsers(r.Users))
	setBool(KeyUsersPassEncrypted, r.UsersPassEncrypted)
	set(KeyReqPathSearch, r.ReqPathSearch)
	set(KeyReqPathReplace, r.ReqPathReplace)
	set(KeyOutboundHostname, r.OutboundHostname)
	setBool(KeyXForwardedProto, r.XForwardedProto)
	set(KeyAddHeader, joinHeaders(r.AddHeader))
	set(KeySetHeader, joinHeaders(r.SetHeader))
	setSeconds(KeyTimeoutServer, r.TimeoutServer)
	setSeconds(KeyTimeoutTunnel, r.TimeoutTunnel)
	return kv
}

func joinUsers(us []User) string {
	s := make([]string, len(us))
	for i, u := range us {
		s[i] = u.Name + ":" + u.Password
	}
	return strings.Join(s, ",")
}

func joinHeaders(hs []Header) string {
	s := make([]string, len(hs))
	for i, h := range hs {
		s[i] = h.Name + ":" + h.Value
	}
	return strings.Join(s, ",")
}

// FromKV rebuilds a route from its service folder's keys, as written by KV or by the original
// product, and validates it: a hand-edited key cannot reach haproxy.cfg either.
func FromKV(serviceName string, kv map[string]string) (Route, error) {
	r := Route{
		ServiceName:  serviceName,
		ServiceColor: strings.TrimSpace(kv[KeyColor]),
		PathType:     PathType(strings.TrimSpace(kv[KeyPathType])),
	}
	if p := kv[KeyPath]; p != "" {
		r.ServicePath = strings.Split(p, ",")
	}
	if d := kv[KeyDomain]; d != "" {
		r.ServiceDomain = strings.Split(d, ",")
	}
	if r.PathType == "" {
		r.PathType = DefaultPathType
	}
	if v := strings.TrimSpace(kv[KeySkipCheck]); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return Route{}, fmt.Errorf("route %s: key %s: %q is not a boolean", serviceName, KeySkipCheck, v)
		}
		r.SkipCheck = b
	}
	err := r.parseOptions(func(param string) string { return strings.TrimSpace(kv[optionKeys[param]]) })
	if err != nil {
		return Route{}, fmt.Errorf("route %s from KV: %w", serviceName, err)
	}
	if err := r.parseTemplates(func(param string) string { return strings.TrimSpace(kv[templateKeys[param]]) }); err != nil {
		return Route{}, fmt.Errorf("route %s from KV: %w", serviceName, err)
	}
	if r.Dests, err = destsFromKV(serviceName, kv); err != nil {
		return Route{}, fmt.Errorf("route %s from KV: %w", serviceName, err)
	}
	if err := r.Validate(); err != nil {
		return Route{}, fmt.Errorf("route %s from KV: %w", serviceName, err)
	}
	return r, nil
}

// KVVersion tells one state of a route's folder in Consul KV from another: the highest ModifyIndex
// of its keys and their number. Every write to the folder changes it: a key set or added raises the
// index (Consul's indexes only grow), a key deleted lowers the count. The zero KVVersion is a
// folder without keys.
type KVVersion struct {
	Index uint64
	Keys  int
}

// KVTable is the route table, or some folders of it, as read from Consul KV.
type KVTable struct {
	// Routes are the folders that are valid routes, sorted by name; Invalid says why each of the
	// others is not, sorted by name.
	Routes  []Route
	Invalid []error
	// Versions has every folder read, valid or not; a folder without keys is not in it.
	Versions map[string]KVVersion
	// Index is Consul's index of a read of the whole table (the highest of its keys and
	// deletions): a watch of the table that starts from Versions blocks from it. 0 when unknown.
	Index uint64
}
