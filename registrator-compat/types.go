// Package registrator registers Docker containers in Consul by Registrator's rules
// (gliderlabs/registrator v7): the service name from the image or SERVICE_NAME, one registration
// per published port, the ID <host>:<container>:<port>, checks from SERVICE_CHECK_*. It is the
// registrar that users of the original product ran on every Docker host, made robust: it follows a
// restarted Docker engine, survives Consul outages and cleans up after crashes.
package registrator

// Container is what the rules read of a container: the parts of `docker inspect` that matter.
type Container struct {
	ID   string
	Name string // without the leading '/'
	// Image is the image as the container was created from it, e.g. "vfarcic/books-ms:1.0".
	Image  string
	Env    []string // KEY=VALUE
	Labels map[string]string
	// IP is the container's address on its network, used with -internal.
	IP string
	// Ports lists every exposed port, with its host binding when published.
	Ports []Port
}

// Port is one exposed port of a container and, when published, where it is published.
type Port struct {
	ExposedPort int
	Proto       string // "tcp" or "udp"
	HostIP      string // "" or "0.0.0.0" when published on every address
	HostPort    int    // 0 when not published
}

// Options are the registrar's flags that the rules depend on.
type Options struct {
	// Hostname is the registrar's host name, the first part of every service ID.
	Hostname string
	// HostIP (-ip) is the address registered for published ports; when empty, the binding's host IP,
	// and DefaultIP when the binding is on every address.
	HostIP    string
	DefaultIP string
	Internal  bool // -internal: the container's IP and the exposed port
	Explicit  bool // -explicit: only ports with a name from SERVICE_NAME or SERVICE_<port>_NAME
	// UseIPFromLabel (-useIpFromLabel) names a label holding the address to register ("/CIDR" dropped).
	UseIPFromLabel string
	Tags           []string // -tags, added to every service
}

// Service is one registration in Consul.
type Service struct {
	ID      string
	Name    string
	Address string
	Port    int
	Tags    []string
	Meta    map[string]string
	Check   *Check // nil: no check

	// Where the registration comes from.
	ContainerID   string
	ContainerName string
	ExposedPort   int
	Proto         string
}

// Check is the Consul check of a service, from the SERVICE_CHECK_* keys.
type Check struct {
	HTTP            string // full URL, for check_http and check_https
	Method          string
	TLSSkipVerify   bool
	TCP             string   // host:port
	GRPC            string   // host:port[/service]
	TTL             string   // e.g. "30s"
	Args            []string // script checks: ["sh", "-c", script]
	Interval        string
	Timeout         string
	InitialStatus   string
	DeregisterAfter string
}
