package route

import (
	"reflect"
	"testing"
)

// Equal must see every field of a destination too: the renderer keeps a route's text for as long
// as Equal holds, so a change it missed would leave the old text in haproxy.cfg.
func TestEqualComparesEveryFieldOfADestination(t *testing.T) {
	a := everything()
	dt := reflect.TypeOf(Dest{})
	for i := 0; i < dt.NumField(); i++ {
		b := everything()
		f := reflect.ValueOf(&b.Dests[0]).Elem().Field(i)
		switch f.Kind() {
		case reflect.String:
			f.SetString(f.String() + "x")
		case reflect.Int:
			f.SetInt(f.Int() + 1)
		case reflect.Slice:
			f.Set(reflect.Append(f, reflect.New(f.Type().Elem()).Elem()))
		default:
			t.Fatalf("field %s: kind %s not covered by this test", dt.Field(i).Name, f.Kind())
		}
		if a.Equal(b) || b.Equal(a) {
			t.Errorf("Equal does not compare a destination's %s", dt.Field(i).Name)
		}
	}
}

func TestCloneSharesNoSlice(t *testing.T) {
	r := everything()
	c := r.Clone()
	if !c.Equal(r) || !reflect.DeepEqual(c, r) {
		t.Fatalf("Clone() = %+v, want %+v", c, r)
	}
	c.ServicePath[0], c.ServiceDomain[0], c.Users[0].Name = "/other", "other.example.com", "other"
	c.AddHeader[0].Value, c.SetHeader[0].Value = "other", "other"
	c.Dests[0].ServicePath[0], c.Dests[0].Port = "/other", 1
	c.Dests[1].ServiceDomain = append(c.Dests[1].ServiceDomain, "x")
	if !reflect.DeepEqual(r, everything()) {
		t.Fatalf("changing a clone changed its route: %+v", r)
	}
}
