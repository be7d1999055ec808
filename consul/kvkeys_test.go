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

func TestParseKVEntries(t *testing.T) {
	for name, tc := range map[string]struct {
		in      string
		want    []kvEntry // with values
		scanned bool      // read by the strict scanner, not encoding/json
	}{
		"consul's shape": {string(consulListing(2)), []kvEntry{{"docker-flow/svc-00000/path", []byte("/svc/"), 20}, {"docker-flow/svc-00001/path", []byte("/svc/"), 21}}, true},
		"empty":          {"[]", []kvEntry{}, true},
		"null":           {"null", nil, true},
		"spaces, a session, values null and empty": {" [ {\"Key\" : \"a/b/c\", \"Session\":\"adf4238a-882b-9ddc-4a9d-5b6758e4159e\", \"Value\":null, \"ModifyIndex\" : 7 }, {\"Key\":\"a/b/d\",\"Value\":\"\",\"ModifyIndex\":8} ]\n",
			[]kvEntry{{"a/b/c", nil, 7}, {"a/b/d", []byte{}, 8}}, true},
		"an escaped key":         {`[{"Key":"a/b\u0026c/d","ModifyIndex":3}]`, []kvEntry{{"a/b&c/d", nil, 3}}, false},
		"a nested value":         {`[{"Key":"a/b/c","Meta":{"x":1},"ModifyIndex":3}]`, []kvEntry{{"a/b/c", nil, 3}}, false},
		"a name in another case": {`[{"key":"a/b/c","ModifyIndex":3}]`, []kvEntry{{"a/b/c", nil, 3}}, false},
		"a key twice":            {`[{"Key":"a/b/c","Key":"a/b/d","ModifyIndex":3}]`, []kvEntry{{"a/b/d", nil, 3}}, false},
		"no ModifyIndex":         {`[{"Key":"a/b/c"}]`, []kvEntry{{"a/b/c", nil, 0}}, false},
	} {
		t.Run(name, func(t *testing.T) {
			got, err := parseKVEntries([]byte(tc.in), true)
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("parseKVEntries(%s, values) = %#v, %v; want %#v", tc.in, got, err, tc.want)
			}
			if _, scanned := scanKVEntries([]byte(tc.in), true); scanned != tc.scanned {
				t.Errorf("read by the scanner: %v, want %v", scanned, tc.scanned)
			}
			if _, scanned := scanKVEntries([]byte(tc.in), false); scanned != tc.scanned {
				t.Errorf("read by the scanner without values: %v, want %v", scanned, tc.scanned)
			}
			got, err = parseKVEntries([]byte(tc.in), false)
			for i := range got {
				if got[i].Value != nil {
					t.Errorf("a value without values asked for: %#v", got[i])
				}
			}
			if err != nil || len(got) != len(tc.want) {
				t.Fatalf("parseKVEntries(%s) = %#v, %v; want %d keys", tc.in, got, err, len(tc.want))
			}
		})
	}
	for _, bad := range []string{`[{"Key":"a/b/c","ModifyIndex":-1}]`, `[{"Key":"a/b/c","ModifyIndex":1.5}]`, `[{"Key":1,"ModifyIndex":1}]`, `[{"Key":"a"`, `{}`} {
		if got, err := parseKVEntries([]byte(bad), false); err == nil {
			t.Errorf("parseKVEntries(%s) = %v, want an error", bad, got)
		}
	}
	if got, err := parseKVEntries([]byte(`[{"Key":"a/b/c","Value":"not base64!","ModifyIndex":1}]`), true); err == nil {
		t.Errorf("a value that is not base64: %v, want an error", got)
	}
}

// FuzzParseKVEntries: whatever the input, parseKVEntries answers as encoding/json does, with values
// and without.
func FuzzParseKVEntries(f *testing.F) {
	f.Add(consulListing(3))
	f.Add([]byte(`[{"Key":"a/b\u0026c/d","Flags":0,"Value":null,"ModifyIndex":3},{"Key":"x","Value":"","ModifyIndex":18446744073709551615}]`))
	f.Add([]byte(`[{"KEY":"a","value":"YQ==","modifyindex":1e2}]`))
	f.Fuzz(func(t *testing.T, in []byte) {
		var want []kvEntry
		wantErr := json.Unmarshal(in, &want)
		got, err := parseKVEntries(in, true)
		if (err != nil) != (wantErr != nil) {
			t.Fatalf("parseKVEntries(%q, values): error %v, encoding/json's %v", in, err, wantErr)
		}
		if err == nil && !(len(got) == 0 && len(want) == 0) && !reflect.DeepEqual(got, want) {
			t.Fatalf("parseKVEntries(%q, values) = %#v, encoding/json %#v", in, got, want)
		}

		var wantKeys []keyIndex
		wantErr = json.Unmarshal(in, &wantKeys)
		got, err = parseKVEntries(in, false)
		if (err != nil) != (wantErr != nil) {
			t.Fatalf("parseKVEntries(%q): error %v, encoding/json's %v", in, err, wantErr)
		}
		if err == nil {
			keys := make([]keyIndex, len(got))
			for i, e := range got {
				keys[i] = keyIndex{e.Key, e.ModifyIndex}
			}
			if !(len(keys) == 0 && len(wantKeys) == 0) && !reflect.DeepEqual(keys, wantKeys) {
				t.Fatalf("parseKVEntries(%q) = %#v, encoding/json %#v", in, keys, wantKeys)
			}
		}
	})
}

// The watch's scan (keys and indexes) and the load's (values too), of 10,000 routes of five keys.
func BenchmarkParseKeyIndexes(b *testing.B) { benchmarkParse(b, false) }
func BenchmarkParseKVEntries(b *testing.B)  { benchmarkParse(b, true) }

func benchmarkParse(b *testing.B, values bool) {
	body := consulListing(50000)
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		if _, err := parseKVEntries(body, values); err != nil {
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
