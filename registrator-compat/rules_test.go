package registrator

import (
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

const rulesContainerID = "0123456789abcdef0123456789abcdef"

// rulesContainer is a running container "books" from "vfarcic/books-ms:1.0", port 8080 published on
// 0.0.0.0:32768, changed by mods.
func rulesContainer(mods ...func(*Container)) Container {
	c := Container{
		ID:    rulesContainerID,
		Name:  "books",
		Image: "vfarcic/books-ms:1.0",
		IP:    "10.0.0.5",
		Ports: []Port{{ExposedPort: 8080, Proto: "tcp", HostIP: "0.0.0.0", HostPort: 32768}},
	}
	for _, m := range mods {
		m(&c)
	}
	return c
}

func rulesEnv(kv ...string) func(*Container) {
	return func(c *Container) { c.Env = append(c.Env, kv...) }
}

func rulesLabels(kv ...string) func(*Container) {
	return func(c *Container) {
		if c.Labels == nil {
			c.Labels = map[string]string{}
		}
		for _, s := range kv {
			k, v, _ := strings.Cut(s, "=")
			c.Labels[k] = v
		}
	}
}

func rulesPorts(p ...Port) func(*Container) {
	return func(c *Container) { c.Ports = p }
}

func rulesImage(image string) func(*Container) {
	return func(c *Container) { c.Image = image }
}

// rulesPublished is port exposed/proto published on 0.0.0.0:host.
func rulesPublished(exposed int, proto string, host int) Port {
	return Port{ExposedPort: exposed, Proto: proto, HostIP: "0.0.0.0", HostPort: host}
}

var rulesOptions = Options{Hostname: "node1", DefaultIP: "192.168.0.10"}

func rulesOpts(mod func(*Options)) Options {
	o := rulesOptions
	if mod != nil {
		mod(&o)
	}
	return o
}

// rulesSvc is the registration of rulesContainer() on port 8080, changed by mod.
func rulesSvc(mod func(*Service)) Service {
	s := Service{
		ID:            "node1:books:8080",
		Name:          "books-ms",
		Address:       "192.168.0.10",
		Port:          32768,
		ContainerID:   rulesContainerID,
		ContainerName: "books",
		ExposedPort:   8080,
		Proto:         "tcp",
	}
	if mod != nil {
		mod(&s)
	}
	return s
}

// rulesOnPort is rulesSvc for another published port (0.0.0.0:host) of rulesContainer().
func rulesOnPort(exposed int, proto string, host int, mod func(*Service)) Service {
	return rulesSvc(func(s *Service) {
		s.ID = "node1:books:" + strconv.Itoa(exposed)
		if proto != "tcp" {
			s.ID += ":" + proto
		}
		s.Name = "books-ms-" + strconv.Itoa(exposed)
		s.Port = host
		s.ExposedPort = exposed
		s.Proto = proto
		if mod != nil {
			mod(s)
		}
	})
}

func rulesMeta(kv ...string) map[string]string {
	m := map[string]string{}
	for _, s := range kv {
		k, v, _ := strings.Cut(s, "=")
		m[k] = v
	}
	return m
}

type rulesCase struct {
	name string
	c    Container
	o    Options
	want []Service
	// warn holds, in order, a part of each warning expected.
	warn []string
}

func TestServicesNames(t *testing.T) {
	runRulesCases(t, []rulesCase{
		{
			name: "name from image with a tag",
			c:    rulesContainer(),
			o:    rulesOptions,
			want: []Service{rulesSvc(nil)},
		},
		{
			name: "name from image with a registry port and a digest",
			c:    rulesContainer(rulesImage("registry:5000/team/app@sha256:0123456789abcdef")),
			o:    rulesOptions,
			want: []Service{rulesSvc(func(s *Service) { s.Name = "app" })},
		},
		{
			name: "name from image with a registry port and no tag",
			c:    rulesContainer(rulesImage("localhost:5000/app")),
			o:    rulesOptions,
			want: []Service{rulesSvc(func(s *Service) { s.Name = "app" })},
		},
		{
			name: "name from image with a tag and a digest",
			c:    rulesContainer(rulesImage("registry.example.com:5000/team/app:1.0@sha256:0123")),
			o:    rulesOptions,
			want: []Service{rulesSvc(func(s *Service) { s.Name = "app" })},
		},
		{
			name: "name from a bare image",
			c:    rulesContainer(rulesImage("nginx")),
			o:    rulesOptions,
			want: []Service{rulesSvc(func(s *Service) { s.Name = "nginx" })},
		},
		{
			name: "no image and no SERVICE_NAME: skipped",
			c:    rulesContainer(rulesImage("")),
			o:    rulesOptions,
			warn: []string{"container books (0123456789ab) port 8080/tcp: no service name"},
		},
		{
			name: "SERVICE_NAME",
			c:    rulesContainer(rulesEnv("SERVICE_NAME=api")),
			o:    rulesOptions,
			want: []Service{rulesSvc(func(s *Service) { s.Name = "api" })},
		},
		{
			name: "SERVICE_<port>_NAME for that port only",
			c:    rulesContainer(rulesEnv("SERVICE_9090_NAME=admin", "SERVICE_8080_NAME=api")),
			o:    rulesOptions,
			want: []Service{rulesSvc(func(s *Service) { s.Name = "api" })},
		},
		{
			name: "SERVICE_<port>_NAME overrides SERVICE_NAME",
			c:    rulesContainer(rulesEnv("SERVICE_8080_NAME=api", "SERVICE_NAME=generic")),
			o:    rulesOptions,
			want: []Service{rulesSvc(func(s *Service) { s.Name = "api" })},
		},
		{
			name: "several ports: image name gets -<port>",
			c:    rulesContainer(rulesPorts(rulesPublished(8080, "tcp", 32768), rulesPublished(9090, "tcp", 32769))),
			o:    rulesOptions,
			want: []Service{rulesOnPort(8080, "tcp", 32768, nil), rulesOnPort(9090, "tcp", 32769, nil)},
		},
		{
			name: "several ports: SERVICE_NAME gets -<port>",
			c: rulesContainer(rulesEnv("SERVICE_NAME=api"),
				rulesPorts(rulesPublished(8080, "tcp", 32768), rulesPublished(9090, "tcp", 32769))),
			o: rulesOptions,
			want: []Service{
				rulesOnPort(8080, "tcp", 32768, func(s *Service) { s.Name = "api-8080" }),
				rulesOnPort(9090, "tcp", 32769, func(s *Service) { s.Name = "api-9090" }),
			},
		},
		{
			name: "several ports: SERVICE_<port>_NAME gets no suffix",
			c: rulesContainer(rulesEnv("SERVICE_8080_NAME=api"),
				rulesPorts(rulesPublished(8080, "tcp", 32768), rulesPublished(9090, "tcp", 32769))),
			o: rulesOptions,
			want: []Service{
				rulesOnPort(8080, "tcp", 32768, func(s *Service) { s.Name = "api" }),
				rulesOnPort(9090, "tcp", 32769, nil),
			},
		},
		{
			name: "several ports: an empty SERVICE_<port>_NAME is no name",
			c: rulesContainer(rulesEnv("SERVICE_NAME=api", "SERVICE_8080_NAME="),
				rulesPorts(rulesPublished(8080, "tcp", 32768), rulesPublished(9090, "tcp", 32769))),
			o: rulesOptions,
			want: []Service{
				rulesOnPort(8080, "tcp", 32768, func(s *Service) { s.Name = "books-ms-8080" }),
				rulesOnPort(9090, "tcp", 32769, func(s *Service) { s.Name = "api-9090" }),
			},
		},
		{
			name: "invalid name with a space: skipped",
			c:    rulesContainer(rulesEnv("SERVICE_NAME=my api")),
			o:    rulesOptions,
			warn: []string{`port 8080/tcp: service name "my api"`},
		},
		{
			name: "invalid name with a slash: skipped, the other port stays",
			c: rulesContainer(rulesEnv("SERVICE_8080_NAME=api/v1"),
				rulesPorts(rulesPublished(8080, "tcp", 32768), rulesPublished(9090, "tcp", 32769))),
			o:    rulesOptions,
			want: []Service{rulesOnPort(9090, "tcp", 32769, nil)},
			warn: []string{`port 8080/tcp: service name "api/v1"`},
		},
		{
			name: "name case is kept",
			c:    rulesContainer(rulesEnv("SERVICE_NAME=Books_API.v2")),
			o:    rulesOptions,
			want: []Service{rulesSvc(func(s *Service) { s.Name = "Books_API.v2" })},
		},
		{
			name: "explicit: no name, not registered",
			c:    rulesContainer(),
			o:    rulesOpts(func(o *Options) { o.Explicit = true }),
		},
		{
			name: "explicit: SERVICE_NAME registered",
			c:    rulesContainer(rulesEnv("SERVICE_NAME=api")),
			o:    rulesOpts(func(o *Options) { o.Explicit = true }),
			want: []Service{rulesSvc(func(s *Service) { s.Name = "api" })},
		},
		{
			name: "explicit: only the port with SERVICE_<port>_NAME",
			c: rulesContainer(rulesEnv("SERVICE_9090_NAME=admin"),
				rulesPorts(rulesPublished(8080, "tcp", 32768), rulesPublished(9090, "tcp", 32769))),
			o:    rulesOpts(func(o *Options) { o.Explicit = true }),
			want: []Service{rulesOnPort(9090, "tcp", 32769, func(s *Service) { s.Name = "admin" })},
		},
	})
}

func TestServicesIgnoreTagsID(t *testing.T) {
	runRulesCases(t, []rulesCase{
		{
			name: "SERVICE_IGNORE",
			c:    rulesContainer(rulesEnv("SERVICE_IGNORE=true")),
			o:    rulesOptions,
		},
		{
			name: "empty SERVICE_IGNORE does not ignore",
			c:    rulesContainer(rulesEnv("SERVICE_IGNORE=")),
			o:    rulesOptions,
			want: []Service{rulesSvc(func(s *Service) { s.Meta = rulesMeta("ignore=") })},
		},
		{
			name: "SERVICE_<port>_IGNORE: the other port keeps its -<port> name",
			c: rulesContainer(rulesEnv("SERVICE_9090_IGNORE=1"),
				rulesPorts(rulesPublished(8080, "tcp", 32768), rulesPublished(9090, "tcp", 32769))),
			o:    rulesOptions,
			want: []Service{rulesOnPort(8080, "tcp", 32768, nil)},
		},
		{
			name: "SERVICE_TAGS with an escaped comma, trimmed, empty and duplicate dropped",
			c:    rulesContainer(rulesEnv(`SERVICE_TAGS=a,b\,c, d ,,a`)),
			o:    rulesOptions,
			want: []Service{rulesSvc(func(s *Service) { s.Tags = []string{"a", "b,c", "d"} })},
		},
		{
			name: "-tags after SERVICE_TAGS, no duplicates",
			c:    rulesContainer(rulesEnv("SERVICE_TAGS=a,b")),
			o:    rulesOpts(func(o *Options) { o.Tags = []string{"prod", "a", " "} }),
			want: []Service{rulesSvc(func(s *Service) { s.Tags = []string{"a", "b", "prod"} })},
		},
		{
			name: "UDP port: udp tag last and :udp ID",
			c:    rulesContainer(rulesEnv("SERVICE_TAGS=dns"), rulesPorts(rulesPublished(53, "udp", 5353))),
			o:    rulesOpts(func(o *Options) { o.Tags = []string{"prod"} }),
			want: []Service{rulesOnPort(53, "udp", 5353, func(s *Service) {
				s.Name = "books-ms"
				s.Tags = []string{"dns", "prod", "udp"}
			})},
		},
		{
			name: "TCP and UDP on one port number: two services",
			c:    rulesContainer(rulesPorts(rulesPublished(53, "udp", 53), rulesPublished(53, "tcp", 53))),
			o:    rulesOptions,
			want: []Service{
				rulesOnPort(53, "tcp", 53, func(s *Service) { s.Name = "books-ms-53" }),
				rulesOnPort(53, "udp", 53, func(s *Service) { s.Name = "books-ms-53"; s.Tags = []string{"udp"} }),
			},
		},
		{
			name: "SERVICE_ID replaces the ID",
			c:    rulesContainer(rulesEnv("SERVICE_ID=books-1")),
			o:    rulesOptions,
			want: []Service{rulesSvc(func(s *Service) { s.ID = "books-1" })},
		},
		{
			name: "SERVICE_<port>_ID overrides SERVICE_ID",
			c:    rulesContainer(rulesEnv("SERVICE_8080_ID=books-http", "SERVICE_ID=books-1")),
			o:    rulesOptions,
			want: []Service{rulesSvc(func(s *Service) { s.ID = "books-http" })},
		},
		{
			name: "SERVICE_ID on a UDP port replaces the :udp ID too",
			c:    rulesContainer(rulesEnv("SERVICE_ID=dns-1"), rulesPorts(rulesPublished(53, "udp", 5353))),
			o:    rulesOptions,
			want: []Service{rulesOnPort(53, "udp", 5353, func(s *Service) {
				s.ID = "dns-1"
				s.Name = "books-ms"
				s.Tags = []string{"udp"}
			})},
		},
		{
			name: "one SERVICE_ID for two ports: the second is skipped",
			c: rulesContainer(rulesEnv("SERVICE_ID=books-1"),
				rulesPorts(rulesPublished(9090, "tcp", 32769), rulesPublished(8080, "tcp", 32768))),
			o:    rulesOptions,
			want: []Service{rulesOnPort(8080, "tcp", 32768, func(s *Service) { s.ID = "books-1" })},
			warn: []string{`port 9090/tcp: service ID "books-1" already used by port 8080/tcp`},
		},
		{
			name: "container name with a leading slash",
			c:    rulesContainer(func(c *Container) { c.Name = "/books" }),
			o:    rulesOptions,
			want: []Service{rulesSvc(nil)},
		},
		{
			name: "sorted by ID",
			c: rulesContainer(rulesPorts(rulesPublished(9090, "tcp", 32769), rulesPublished(10000, "tcp", 32770),
				rulesPublished(8080, "tcp", 32768))),
			o: rulesOptions,
			want: []Service{
				rulesOnPort(10000, "tcp", 32770, nil), // "node1:books:10000" < "node1:books:8080"
				rulesOnPort(8080, "tcp", 32768, nil),
				rulesOnPort(9090, "tcp", 32769, nil),
			},
		},
	})
}

func TestServicesMetadataSources(t *testing.T) {
	runRulesCases(t, []rulesCase{
		{
			name: "labels override env: name, tags and check",
			c: rulesContainer(
				rulesEnv("SERVICE_NAME=from-env", "SERVICE_TAGS=env", "SERVICE_CHECK_HTTP=/env"),
				rulesLabels("SERVICE_NAME=from-label", "SERVICE_TAGS=label", "SERVICE_CHECK_HTTP=/label")),
			o: rulesOptions,
			want: []Service{rulesSvc(func(s *Service) {
				s.Name = "from-label"
				s.Tags = []string{"label"}
				s.Meta = rulesMeta("check_http=/label")
				s.Check = &Check{HTTP: "http://192.168.0.10:32768/label", Interval: "10s"}
			})},
		},
		{
			name: "SERVICE_<port>_ env var beats a generic label",
			c:    rulesContainer(rulesEnv("SERVICE_8080_NAME=api"), rulesLabels("SERVICE_NAME=generic")),
			o:    rulesOptions,
			want: []Service{rulesSvc(func(s *Service) { s.Name = "api" })},
		},
		{
			name: "SERVICE_<port>_ label beats SERVICE_<port>_ env var",
			c:    rulesContainer(rulesEnv("SERVICE_8080_NAME=env"), rulesLabels("SERVICE_8080_NAME=label")),
			o:    rulesOptions,
			want: []Service{rulesSvc(func(s *Service) { s.Name = "label" })},
		},
		{
			name: "other keys are not metadata; env without = ignored",
			c: rulesContainer(rulesEnv("PATH=/bin", "SERVICE_NAME", "service_name=lower", "SERVICE_VERSION=1.2"),
				rulesLabels("com.example.team=books")),
			o:    rulesOptions,
			want: []Service{rulesSvc(func(s *Service) { s.Meta = rulesMeta("version=1.2") })},
		},
		{
			name: "Meta: every key but name, id and tags, lowercased",
			c: rulesContainer(rulesEnv("SERVICE_NAME=api", "SERVICE_ID=x", "SERVICE_TAGS=t", "SERVICE_Version=1.2",
				"SERVICE_8080_OWNER=team-a", "SERVICE_9090_OWNER=team-b", "SERVICE_CHECK_TTL=30s")),
			o: rulesOptions,
			want: []Service{rulesSvc(func(s *Service) {
				s.ID, s.Name, s.Tags = "x", "api", []string{"t"}
				s.Meta = rulesMeta("version=1.2", "owner=team-a", "check_ttl=30s")
				s.Check = &Check{TTL: "30s"}
			})},
		},
		{
			name: "Meta: invalid keys and values dropped with warnings",
			c: rulesContainer(rulesEnv(
				"SERVICE_BAD.KEY=x",
				"SERVICE_CONSUL-VERSION=1",
				"SERVICE_"+strings.Repeat("k", 129)+"=long key",
				"SERVICE_BIG="+strings.Repeat("v", 513),
				"SERVICE_OK="+strings.Repeat("v", 512),
			)),
			o: rulesOptions,
			want: []Service{rulesSvc(func(s *Service) {
				s.Meta = rulesMeta("ok=" + strings.Repeat("v", 512))
			})},
			warn: []string{
				`meta key "bad.key" is not made of`,
				`meta key "big": value longer than 512`,
				`meta key "consul-version": the prefix "consul-" is reserved`,
				`meta key "kkkk`,
			},
		},
		{
			name: "Meta: at most 64 keys",
			c: rulesContainer(func(c *Container) {
				for i := range 65 {
					c.Env = append(c.Env, fmt.Sprintf("SERVICE_K%02d=v", i))
				}
			}),
			o: rulesOptions,
			want: []Service{rulesSvc(func(s *Service) {
				s.Meta = map[string]string{}
				for i := range 64 {
					s.Meta[fmt.Sprintf("k%02d", i)] = "v"
				}
			})},
			warn: []string{`meta key "k64": more than 64 keys`},
		},
	})
}

func TestServicesChecks(t *testing.T) {
	withCheck := func(check *Check, kv ...string) func(*Service) {
		return func(s *Service) { s.Check = check; s.Meta = rulesMeta(kv...) }
	}
	runRulesCases(t, []rulesCase{
		{
			name: "no check key: no check",
			c:    rulesContainer(rulesEnv("SERVICE_CHECK_INTERVAL=5s")),
			o:    rulesOptions,
			want: []Service{rulesSvc(withCheck(nil, "check_interval=5s"))},
		},
		{
			name: "HTTP with method, interval, timeout, initial status and deregister-after",
			c: rulesContainer(rulesEnv("SERVICE_CHECK_HTTP=/health", "SERVICE_CHECK_HTTP_METHOD=HEAD",
				"SERVICE_CHECK_INTERVAL=5s", "SERVICE_CHECK_TIMEOUT=1s", "SERVICE_CHECK_INITIAL_STATUS=passing",
				"SERVICE_CHECK_DEREGISTER_AFTER=10m")),
			o: rulesOptions,
			want: []Service{rulesSvc(withCheck(&Check{
				HTTP: "http://192.168.0.10:32768/health", Method: "HEAD", Interval: "5s", Timeout: "1s",
				InitialStatus: "passing", DeregisterAfter: "10m",
			}, "check_http=/health", "check_http_method=HEAD", "check_interval=5s", "check_timeout=1s",
				"check_initial_status=passing", "check_deregister_after=10m"))},
		},
		{
			name: "HTTPS: skip TLS verification, https method",
			c: rulesContainer(rulesEnv("SERVICE_CHECK_HTTPS=/health", "SERVICE_CHECK_HTTPS_METHOD=POST",
				"SERVICE_CHECK_HTTP_METHOD=HEAD")),
			o: rulesOptions,
			want: []Service{rulesSvc(withCheck(&Check{
				HTTP: "https://192.168.0.10:32768/health", Method: "POST", TLSSkipVerify: true, Interval: "10s",
			}, "check_https=/health", "check_https_method=POST", "check_http_method=HEAD"))},
		},
		{
			name: "TCP with timeout and initial status",
			c: rulesContainer(rulesEnv("SERVICE_CHECK_TCP=true", "SERVICE_CHECK_TIMEOUT=3s",
				"SERVICE_CHECK_INITIAL_STATUS=warning")),
			o: rulesOptions,
			want: []Service{rulesSvc(withCheck(&Check{
				TCP: "192.168.0.10:32768", Interval: "10s", Timeout: "3s", InitialStatus: "warning",
			}, "check_tcp=true", "check_timeout=3s", "check_initial_status=warning"))},
		},
		{
			name: "gRPC without a service name",
			c:    rulesContainer(rulesEnv("SERVICE_CHECK_GRPC=true", "SERVICE_CHECK_INTERVAL=30s")),
			o:    rulesOptions,
			want: []Service{rulesSvc(withCheck(&Check{GRPC: "192.168.0.10:32768", Interval: "30s"},
				"check_grpc=true", "check_interval=30s"))},
		},
		{
			name: "gRPC with a service name and deregister-after",
			c:    rulesContainer(rulesEnv("SERVICE_CHECK_GRPC=books.v1.Books", "SERVICE_CHECK_DEREGISTER_AFTER=1h")),
			o:    rulesOptions,
			want: []Service{rulesSvc(withCheck(&Check{
				GRPC: "192.168.0.10:32768/books.v1.Books", Interval: "10s", DeregisterAfter: "1h",
			}, "check_grpc=books.v1.Books", "check_deregister_after=1h"))},
		},
		{
			name: "TTL: no interval and no timeout, initial status and deregister-after kept",
			c: rulesContainer(rulesEnv("SERVICE_CHECK_TTL=30s", "SERVICE_CHECK_INTERVAL=5s", "SERVICE_CHECK_TIMEOUT=1s",
				"SERVICE_CHECK_INITIAL_STATUS=critical", "SERVICE_CHECK_DEREGISTER_AFTER=5m")),
			o: rulesOptions,
			want: []Service{rulesSvc(withCheck(&Check{TTL: "30s", InitialStatus: "critical", DeregisterAfter: "5m"},
				"check_ttl=30s", "check_interval=5s", "check_timeout=1s", "check_initial_status=critical",
				"check_deregister_after=5m"))},
		},
		{
			name: "script with $SERVICE_IP and $SERVICE_PORT",
			c: rulesContainer(rulesEnv("SERVICE_CHECK_SCRIPT=nc -z $SERVICE_IP $SERVICE_PORT || echo $SERVICE_IP",
				"SERVICE_CHECK_TIMEOUT=2s")),
			o: rulesOptions,
			want: []Service{rulesSvc(withCheck(&Check{
				Args:     []string{"sh", "-c", "nc -z 192.168.0.10 32768 || echo 192.168.0.10"},
				Interval: "10s", Timeout: "2s",
			}, "check_script=nc -z $SERVICE_IP $SERVICE_PORT || echo $SERVICE_IP", "check_timeout=2s"))},
		},
		{
			name: "first match wins: http over tcp and ttl",
			c:    rulesContainer(rulesEnv("SERVICE_CHECK_TTL=30s", "SERVICE_CHECK_TCP=true", "SERVICE_CHECK_HTTP=/h")),
			o:    rulesOptions,
			want: []Service{rulesSvc(withCheck(&Check{HTTP: "http://192.168.0.10:32768/h", Interval: "10s"},
				"check_ttl=30s", "check_tcp=true", "check_http=/h"))},
		},
		{
			name: "first match wins: grpc over ttl over script",
			c:    rulesContainer(rulesEnv("SERVICE_CHECK_SCRIPT=true", "SERVICE_CHECK_TTL=30s", "SERVICE_CHECK_GRPC=true")),
			o:    rulesOptions,
			want: []Service{rulesSvc(withCheck(&Check{GRPC: "192.168.0.10:32768", Interval: "10s"},
				"check_script=true", "check_ttl=30s", "check_grpc=true"))},
		},
		{
			name: "SERVICE_<port>_CHECK_HTTP for that port only",
			c: rulesContainer(rulesEnv("SERVICE_8080_CHECK_HTTP=/health"),
				rulesPorts(rulesPublished(8080, "tcp", 32768), rulesPublished(9090, "tcp", 32769))),
			o: rulesOptions,
			want: []Service{
				rulesOnPort(8080, "tcp", 32768, withCheck(&Check{HTTP: "http://192.168.0.10:32768/health", Interval: "10s"},
					"check_http=/health")),
				rulesOnPort(9090, "tcp", 32769, nil),
			},
		},
		{
			name: "bad interval: default 10s",
			c:    rulesContainer(rulesEnv("SERVICE_CHECK_TCP=1", "SERVICE_CHECK_INTERVAL=often")),
			o:    rulesOptions,
			want: []Service{rulesSvc(withCheck(&Check{TCP: "192.168.0.10:32768", Interval: "10s"},
				"check_tcp=1", "check_interval=often"))},
			warn: []string{`port 8080/tcp: check_interval "often" is not a positive duration; using 10s`},
		},
		{
			name: "bad timeout, deregister-after and initial status: dropped",
			c: rulesContainer(rulesEnv("SERVICE_CHECK_TCP=1", "SERVICE_CHECK_TIMEOUT=10", "SERVICE_CHECK_DEREGISTER_AFTER=-1m",
				"SERVICE_CHECK_INITIAL_STATUS=up")),
			o: rulesOptions,
			want: []Service{rulesSvc(withCheck(&Check{TCP: "192.168.0.10:32768", Interval: "10s"},
				"check_tcp=1", "check_timeout=10", "check_deregister_after=-1m", "check_initial_status=up"))},
			warn: []string{
				`check_timeout "10" is not a positive duration`,
				`check_deregister_after "-1m" is not a positive duration`,
				`check_initial_status "up" is not passing, warning or critical`,
			},
		},
		{
			name: "bad TTL: no check",
			c:    rulesContainer(rulesEnv("SERVICE_CHECK_TTL=0s")),
			o:    rulesOptions,
			want: []Service{rulesSvc(withCheck(nil, "check_ttl=0s"))},
			warn: []string{`check_ttl "0s" is not a positive duration; check skipped`},
		},
		{
			name: "no address: no HTTP check",
			c:    rulesContainer(rulesEnv("SERVICE_CHECK_HTTP=/health")),
			o:    rulesOpts(func(o *Options) { o.DefaultIP = "" }),
			want: []Service{rulesSvc(func(s *Service) { s.Address = ""; s.Meta = rulesMeta("check_http=/health") })},
			warn: []string{"check_http: the service has no address to check"},
		},
	})
}

func TestServicesPortsAndAddresses(t *testing.T) {
	runRulesCases(t, []rulesCase{
		{
			name: "unpublished port skipped without -internal",
			c:    rulesContainer(rulesPorts(Port{ExposedPort: 8080, Proto: "tcp"})),
			o:    rulesOptions,
		},
		{
			name: "one published and one unpublished port: not a group",
			c:    rulesContainer(rulesPorts(rulesPublished(8080, "tcp", 32768), Port{ExposedPort: 9090, Proto: "tcp"})),
			o:    rulesOptions,
			want: []Service{rulesSvc(nil)},
		},
		{
			name: "binding IP",
			c:    rulesContainer(rulesPorts(Port{ExposedPort: 8080, Proto: "tcp", HostIP: "10.1.1.1", HostPort: 32768})),
			o:    rulesOptions,
			want: []Service{rulesSvc(func(s *Service) { s.Address = "10.1.1.1" })},
		},
		{
			name: "empty binding IP: default IP; empty proto is tcp",
			c:    rulesContainer(rulesPorts(Port{ExposedPort: 8080, HostPort: 32768})),
			o:    rulesOptions,
			want: []Service{rulesSvc(nil)},
		},
		{
			name: ":: binding: default IP",
			c:    rulesContainer(rulesPorts(Port{ExposedPort: 8080, Proto: "tcp", HostIP: "::", HostPort: 32768})),
			o:    rulesOptions,
			want: []Service{rulesSvc(nil)},
		},
		{
			name: "IPv6 binding kept raw, bracketed in the check",
			c: rulesContainer(rulesEnv("SERVICE_CHECK_HTTP=/health"),
				rulesPorts(Port{ExposedPort: 8080, Proto: "tcp", HostIP: "2001:db8::1", HostPort: 32768})),
			o: rulesOptions,
			want: []Service{rulesSvc(func(s *Service) {
				s.Address = "2001:db8::1"
				s.Meta = rulesMeta("check_http=/health")
				s.Check = &Check{HTTP: "http://[2001:db8::1]:32768/health", Interval: "10s"}
			})},
		},
		{
			name: "-ip overrides the binding",
			c:    rulesContainer(rulesPorts(Port{ExposedPort: 8080, Proto: "tcp", HostIP: "10.1.1.1", HostPort: 32768})),
			o:    rulesOpts(func(o *Options) { o.HostIP = "172.16.0.1" }),
			want: []Service{rulesSvc(func(s *Service) { s.Address = "172.16.0.1" })},
		},
		{
			name: "-useIpFromLabel drops the /CIDR",
			c:    rulesContainer(rulesLabels("io.rancher.container.ip=10.42.0.7/16")),
			o:    rulesOpts(func(o *Options) { o.UseIPFromLabel = "io.rancher.container.ip"; o.HostIP = "172.16.0.1" }),
			want: []Service{rulesSvc(func(s *Service) { s.Address = "10.42.0.7" })},
		},
		{
			name: "-useIpFromLabel with /24 and a check",
			c:    rulesContainer(rulesLabels("ip=10.0.9.3/24", "SERVICE_CHECK_TCP=true")),
			o:    rulesOpts(func(o *Options) { o.UseIPFromLabel = "ip" }),
			want: []Service{rulesSvc(func(s *Service) {
				s.Address = "10.0.9.3"
				s.Meta = rulesMeta("check_tcp=true")
				s.Check = &Check{TCP: "10.0.9.3:32768", Interval: "10s"}
			})},
		},
		{
			name: "-useIpFromLabel without the label: the usual address and a warning",
			c:    rulesContainer(),
			o:    rulesOpts(func(o *Options) { o.UseIPFromLabel = "ip" }),
			want: []Service{rulesSvc(nil)},
			warn: []string{`port 8080/tcp: label "ip" (-useIpFromLabel) is not set; using "192.168.0.10"`},
		},
		{
			name: "-internal: container IP and exposed port, unpublished ports count",
			c: rulesContainer(rulesPorts(rulesPublished(8080, "tcp", 32768), Port{ExposedPort: 9090, Proto: "tcp"}),
				rulesEnv("SERVICE_CHECK_HTTP=/h")),
			o: rulesOpts(func(o *Options) { o.Internal = true; o.HostIP = "172.16.0.1" }),
			want: []Service{
				rulesOnPort(8080, "tcp", 8080, func(s *Service) {
					s.Address = "10.0.0.5"
					s.Meta = rulesMeta("check_http=/h")
					s.Check = &Check{HTTP: "http://10.0.0.5:8080/h", Interval: "10s"}
				}),
				rulesOnPort(9090, "tcp", 9090, func(s *Service) {
					s.Address = "10.0.0.5"
					s.Meta = rulesMeta("check_http=/h")
					s.Check = &Check{HTTP: "http://10.0.0.5:9090/h", Interval: "10s"}
				}),
			},
		},
		{
			name: "-internal with -useIpFromLabel: the label's address, the exposed port",
			c:    rulesContainer(rulesLabels("ip=10.42.0.7/16")),
			o:    rulesOpts(func(o *Options) { o.Internal = true; o.UseIPFromLabel = "ip" }),
			want: []Service{rulesSvc(func(s *Service) { s.Address = "10.42.0.7"; s.Port = 8080 })},
		},
		{
			name: "two bindings of one port: the IPv4 one",
			c: rulesContainer(rulesPorts(
				Port{ExposedPort: 8080, Proto: "tcp", HostIP: "::1", HostPort: 32769},
				Port{ExposedPort: 8080, Proto: "tcp", HostIP: "127.0.0.1", HostPort: 32768},
			)),
			o:    rulesOptions,
			want: []Service{rulesSvc(func(s *Service) { s.Address = "127.0.0.1" })},
		},
		{
			name: "0.0.0.0 and :: bindings of one port: one service, not a group",
			c: rulesContainer(rulesPorts(
				Port{ExposedPort: 8080, Proto: "tcp", HostIP: "0.0.0.0", HostPort: 32768},
				Port{ExposedPort: 8080, Proto: "tcp", HostIP: "::", HostPort: 32768},
			)),
			o:    rulesOptions,
			want: []Service{rulesSvc(nil)},
		},
		{
			name: "exposed and published entries of one port: the published one",
			c: rulesContainer(rulesPorts(
				Port{ExposedPort: 8080, Proto: "tcp"},
				Port{ExposedPort: 8080, Proto: "TCP", HostIP: "::", HostPort: 32768},
			)),
			o:    rulesOptions,
			want: []Service{rulesSvc(nil)},
		},
		{
			name: "invalid port numbers skipped",
			c:    rulesContainer(rulesPorts(Port{ExposedPort: 0, Proto: "tcp", HostPort: 80}, rulesPublished(8080, "tcp", 32768))),
			o:    rulesOptions,
			want: []Service{rulesSvc(nil)},
			warn: []string{"port 0/tcp: invalid port"},
		},
	})
}

func runRulesCases(t *testing.T, cases []rulesCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, warnings := Services(tc.c, tc.o)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("services:\n got  %s\n want %s", rulesDump(got), rulesDump(tc.want))
			}
			if len(warnings) != len(tc.warn) {
				t.Fatalf("warnings: got %d %q, want %d like %q", len(warnings), warnings, len(tc.warn), tc.warn)
			}
			for i, w := range tc.warn {
				if !strings.Contains(warnings[i], w) {
					t.Errorf("warning %d: got %q, want it to contain %q", i, warnings[i], w)
				}
				if !strings.HasPrefix(warnings[i], "container books (0123456789ab) port ") {
					t.Errorf("warning %d: %q does not name the container and port", i, warnings[i])
				}
			}
		})
	}
}

func rulesDump(services []Service) string {
	var b strings.Builder
	for _, s := range services {
		fmt.Fprintf(&b, "\n  %+v", s)
		if s.Check != nil {
			fmt.Fprintf(&b, " check=%+v", *s.Check)
		}
	}
	return b.String()
}

func TestServicesDeterministic(t *testing.T) {
	c := rulesContainer(
		rulesLabels("SERVICE_B=1", "SERVICE_A=2", "SERVICE_NAME=api", "SERVICE_8080_NAME=web", "SERVICE_TAGS=x,y"),
		rulesEnv("SERVICE_NAME=env", "SERVICE_BAD.KEY=1", "SERVICE_OTHER.BAD=2"),
		rulesPorts(rulesPublished(9090, "tcp", 32769), rulesPublished(8080, "tcp", 32768), rulesPublished(53, "udp", 53)),
	)
	first, firstWarnings := Services(c, rulesOptions)
	for range 50 {
		got, warnings := Services(c, rulesOptions)
		if !reflect.DeepEqual(got, first) || !reflect.DeepEqual(warnings, firstWarnings) {
			t.Fatalf("results differ between calls:\n%s\n%q\n%s\n%q", rulesDump(first), firstWarnings, rulesDump(got), warnings)
		}
	}
}

func TestSplitTags(t *testing.T) {
	for in, want := range map[string][]string{
		``:          {""},
		`a`:         {"a"},
		`a,b`:       {"a", "b"},
		`a\,b,c`:    {"a,b", "c"},
		`a\b,c\`:    {`a\b`, `c\`},
		`,a,`:       {"", "a", ""},
		`x\,\,y,,z`: {"x,,y", "", "z"},
	} {
		if got := splitTags(in); !reflect.DeepEqual(got, want) {
			t.Errorf("splitTags(%q) = %q, want %q", in, got, want)
		}
	}
}
