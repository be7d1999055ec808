package route

import (
	"net/url"
	"reflect"
	"slices"
	"testing"
)

func TestFromQueryReadsDestinations(t *testing.T) {
	q, _ := url.ParseQuery("serviceName=books-ms&servicePath=/api&port=8080" +
		"&servicePath.1=/admin,/ops&pathType.1=path_dir&port.1=9000" +
		"&reqMode.2=tcp&srcPort.2=6379&port.2=6379" +
		"&reqMode.3=sni&srcPort.3=8443&serviceDomain.3=a.test,b.test")
	r, err := FromQuery(q)
	if err != nil {
		t.Fatal(err)
	}
	want := []Dest{
		{ServicePath: []string{"/api"}, PathType: PathBeg, Port: 8080},
		{Index: 1, ServicePath: []string{"/admin", "/ops"}, PathType: PathDir, Port: 9000},
		{Index: 2, ReqMode: ModeTCP, SrcPort: 6379, Port: 6379, PathType: PathBeg},
		{Index: 3, ReqMode: ModeSNI, SrcPort: 8443, ServiceDomain: []string{"a.test", "b.test"}, PathType: PathBeg},
	}
	if got := r.Destinations(); !reflect.DeepEqual(got, want) {
		t.Fatalf("Destinations() = %+v\nwant %+v", got, want)
	}
	if got := r.ConsulServices(); !reflect.DeepEqual(got, []string{"books-ms", "books-ms-6379", "books-ms-8080", "books-ms-9000"}) {
		t.Fatalf("ConsulServices() = %v", got)
	}
	back, err := FromKV("books-ms", r.KV())
	if err != nil || !back.Equal(r) {
		t.Fatalf("FromKV(KV()) = %+v, %v\nwant %+v", back, err, r)
	}
}

func TestTCPAndSNIRoutesNeedNoPath(t *testing.T) {
	for _, raw := range []string{
		"serviceName=redis&reqMode=tcp&srcPort=6379",
		"serviceName=redis&serviceColor=blue&reqMode=tcp&srcPort=6379&port=6379",
		"serviceName=tls&reqMode=sni&srcPort=8443&serviceDomain=a.test",
		// Two SNI destinations may share a port: the name tells them apart.
		"serviceName=tls&reqMode=sni&srcPort=8443&serviceDomain=a.test&reqMode.1=sni&srcPort.1=8443&serviceDomain.1=b.test&port.1=9443",
		// Only indexed destinations.
		"serviceName=books-ms&servicePath.1=/a&servicePath.2=/b&port.2=81",
		"serviceName=books-ms&consulTemplateFePath=fe.tmpl&templateFePath=fe.tmpl&servicePath=/a",
	} {
		q, _ := url.ParseQuery(raw)
		r, err := FromQuery(q)
		if err != nil {
			t.Errorf("FromQuery(%q): %v", raw, err)
			continue
		}
		if back, err := FromKV(r.ServiceName, r.KV()); err != nil || !back.Equal(r) {
			t.Errorf("FromKV(KV()) of %q = %+v, %v", raw, back, err)
		}
	}
}

func TestOriginalTemplateKeysAreRead(t *testing.T) {
	r, err := FromKV("books-ms", map[string]string{"path": "/api", "consultemplatefepath": "fe.tmpl", "consultemplatebepath": "be.tmpl"})
	if err != nil || r.TemplateFePath != "fe.tmpl" || r.TemplateBePath != "be.tmpl" {
		t.Fatalf("FromKV = %+v, %v", r, err)
	}
}

// TakesPort agrees with the modes of Destinations.
func TestTakesPortAgreesWithDestinations(t *testing.T) {
	for _, query := range []string{
		"serviceName=a&servicePath=/a",
		"serviceName=a&servicePath=/a&servicePath.1=/b&port.1=9000",
		"serviceName=a&reqMode=tcp&srcPort=6379",
		"serviceName=a&servicePath=/a&reqMode.1=tcp&srcPort.1=6379&port.1=6379",
		"serviceName=tls&reqMode=sni&srcPort=8443&serviceDomain=a.test",
	} {
		q, err := url.ParseQuery(query)
		if err != nil {
			t.Fatal(err)
		}
		r, err := FromQuery(q)
		if err != nil {
			t.Fatalf("%s: %v", query, err)
		}
		want := slices.ContainsFunc(r.Destinations(), func(d Dest) bool { return d.Mode() != ModeHTTP })
		if got := r.TakesPort(); got != want {
			t.Errorf("%s: TakesPort() = %v, want %v", query, got, want)
		}
	}
}
