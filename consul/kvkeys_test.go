package consul

import (
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

// consulListing is a listing as Consul writes it (encoding/json of its KV entries).
func consulListing(n int) []byte {
	var b strings.Builder
	b.WriteByte('[')
	for i := range n {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"LockIndex":0,"Key":"docker-flow/svc-%05d/path","Flags":0,"Value":"L3N2Yy8=","CreateIndex":%d,"ModifyIndex":%d}`, i, 10+i, 20+i)
	}
	b.WriteByte(']')
	return []byte(b.String())
}

func TestParseKeyIndexes(t *testing.T) {
	for name, tc := range map[string]struct {
		in      string
		want    []keyIndex
		scanned bool // read by the strict scanner, not encoding/json
	}{
		"consul's shape": {string(consulListing(2)), []keyIndex{{"docker-flow/svc-00000/path", 20}, {"docker-flow/svc-00001/path", 21}}, true},
		"empty":          {"[]", []keyIndex{}, true},
		"null":           {"null", nil, true},
		"spaces and a session": {" [ {\"Key\" : \"a/b/c\", \"Session\":\"adf4238a-882b-9ddc-4a9d-5b6758e4159e\", \"Value\":null, \"ModifyIndex\" : 7 } ]\n",
			[]keyIndex{{"a/b/c", 7}}, true},
		"an escaped key":         {`[{"Key":"a/b\u0026c/d","ModifyIndex":3}]`, []keyIndex{{"a/b&c/d", 3}}, false},
		"a nested value":         {`[{"Key":"a/b/c","Meta":{"x":1},"ModifyIndex":3}]`, []keyIndex{{"a/b/c", 3}}, false},
		"a name in another case": {`[{"key":"a/b/c","ModifyIndex":3}]`, []keyIndex{{"a/b/c", 3}}, false},
		"a key twice":            {`[{"Key":"a/b/c","Key":"a/b/d","ModifyIndex":3}]`, []keyIndex{{"a/b/d", 3}}, false},
		"no ModifyIndex":         {`[{"Key":"a/b/c"}]`, []keyIndex{{"a/b/c", 0}}, false},
	} {
		t.Run(name, func(t *testing.T) {
			got, err := parseKeyIndexes([]byte(tc.in))
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("parseKeyIndexes(%s) = %#v, %v; want %#v", tc.in, got, err, tc.want)
			}
			if _, scanned := scanKeyIndexes([]byte(tc.in)); scanned != tc.scanned {
				t.Errorf("read by the scanner: %v, want %v", scanned, tc.scanned)
			}
		})
	}
	for _, bad := range []string{`[{"Key":"a/b/c","ModifyIndex":-1}]`, `[{"Key":"a/b/c","ModifyIndex":1.5}]`, `[{"Key":1,"ModifyIndex":1}]`, `[{"Key":"a"`, `{}`} {
		if got, err := parseKeyIndexes([]byte(bad)); err == nil {
			t.Errorf("parseKeyIndexes(%s) = %v, want an error", bad, got)
		}
	}
}

// FuzzParseKeyIndexes: whatever the input, parseKeyIndexes answers as encoding/json does.
func FuzzParseKeyIndexes(f *testing.F) {
	f.Add(consulListing(3))
	f.Add([]byte(`[{"Key":"a/b\u0026c/d","Flags":0,"Value":null,"ModifyIndex":3},{"Key":"x","ModifyIndex":18446744073709551615}]`))
	f.Add([]byte(`[{"KEY":"a","modifyindex":1e2}]`))
	f.Fuzz(func(t *testing.T, in []byte) {
		var want []keyIndex
		wantErr := json.Unmarshal(in, &want)
		got, err := parseKeyIndexes(in)
		if (err != nil) != (wantErr != nil) {
			t.Fatalf("parseKeyIndexes(%q): error %v, encoding/json's %v", in, err, wantErr)
		}
		if err == nil && !(len(got) == 0 && len(want) == 0) && !reflect.DeepEqual(got, want) {
			t.Fatalf("parseKeyIndexes(%q) = %#v, encoding/json %#v", in, got, want)
		}
	})
}

func BenchmarkParseKeyIndexes(b *testing.B) {
	body := consulListing(50000) // 10,000 routes of five keys
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		if _, err := parseKeyIndexes(body); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecodeKVPairs(b *testing.B) {
	body := consulListing(50000)
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		var pairs []struct {
			LockIndex   uint64
			Key         string
			Flags       uint64
			Value       []byte
			CreateIndex uint64
			ModifyIndex uint64
		}
		if err := json.Unmarshal(body, &pairs); err != nil {
			b.Fatal(err)
		}
	}
}
