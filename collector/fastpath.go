package collector

import (
	"maps"
	"slices"

	"google.golang.org/protobuf/encoding/protowire"
)

// The fast path validates an ExportTraceServiceRequest in protobuf encoding and adds the
// node's resource attributes by rewriting only the Resource messages, without building the
// pdata object tree and encoding it again: decoding and re-encoding were most of the relay's
// CPU time. It is never more lenient than ptraceotlp's decoder: it checks every field of
// every trace message for the wire type the schema gives it (and trace and span id lengths),
// as pdata does, and whenever it meets something it does not fully handle — a group, a
// deprecated field that pdata migrates, a duplicated resource, very deep nesting — it
// declines and the caller uses pdata instead. FuzzFastPathMatchesPdata checks that whatever
// it accepts, pdata accepts too, with the same content.

// attrKV is one resource attribute to add, with its KeyValue encoding precomputed.
type attrKV struct {
	key     string
	encoded []byte // field 1 (attributes) of Resource: tag, length, KeyValue{key, AnyValue{string_value}}
}

func encodeAttrs(m map[string]string) []attrKV {
	out := make([]attrKV, 0, len(m))
	for _, k := range slices.Sorted(maps.Keys(m)) {
		v := m[k]
		var av []byte
		av = protowire.AppendTag(av, 1, protowire.BytesType)
		av = protowire.AppendString(av, v)
		var kv []byte
		kv = protowire.AppendTag(kv, 1, protowire.BytesType)
		kv = protowire.AppendString(kv, k)
		kv = protowire.AppendTag(kv, 2, protowire.BytesType)
		kv = protowire.AppendBytes(kv, av)
		var field []byte
		field = protowire.AppendTag(field, 1, protowire.BytesType)
		field = protowire.AppendBytes(field, kv)
		out = append(out, attrKV{key: k, encoded: field})
	}
	return out
}

// Message kinds of the trace schema.
type kind uint8

const (
	kNone kind = iota
	kScopeSpans
	kScope
	kSpan
	kEvent
	kLink
	kStatus
	kKeyValue
	kAnyValue
	kArrayValue
	kKVList
	kEntityRef
	kResource
)

// field types.
type ftype uint8

const (
	fUnknown ftype = iota
	fVarint
	fFixed64
	fFixed32
	fBytes   // string or bytes
	fID16    // trace id: empty or 16 bytes
	fID8     // span id: empty or 8 bytes
	fMessage // nested message of kind
)

type fieldSpec struct {
	t   ftype
	sub kind
}

// schemaMap is the trace schema, by message kind and field number (all numbers are <= 16).
var schemaMap = map[kind]map[protowire.Number]fieldSpec{
	kResource:   {1: {fMessage, kKeyValue}, 2: {fVarint, 0}, 3: {fMessage, kEntityRef}},
	kEntityRef:  {1: {fBytes, 0}, 2: {fBytes, 0}, 3: {fBytes, 0}, 4: {fBytes, 0}},
	kScopeSpans: {1: {fMessage, kScope}, 2: {fMessage, kSpan}, 3: {fBytes, 0}},
	kScope:      {1: {fBytes, 0}, 2: {fBytes, 0}, 3: {fMessage, kKeyValue}, 4: {fVarint, 0}},
	kSpan: {1: {fID16, 0}, 2: {fID8, 0}, 3: {fBytes, 0}, 4: {fID8, 0}, 5: {fBytes, 0}, 6: {fVarint, 0},
		7: {fFixed64, 0}, 8: {fFixed64, 0}, 9: {fMessage, kKeyValue}, 10: {fVarint, 0}, 11: {fMessage, kEvent},
		12: {fVarint, 0}, 13: {fMessage, kLink}, 14: {fVarint, 0}, 15: {fMessage, kStatus}, 16: {fFixed32, 0}},
	kEvent:      {1: {fFixed64, 0}, 2: {fBytes, 0}, 3: {fMessage, kKeyValue}, 4: {fVarint, 0}},
	kLink:       {1: {fID16, 0}, 2: {fID8, 0}, 3: {fBytes, 0}, 4: {fMessage, kKeyValue}, 5: {fVarint, 0}, 6: {fFixed32, 0}},
	kStatus:     {2: {fBytes, 0}, 3: {fVarint, 0}},
	kKeyValue:   {1: {fBytes, 0}, 2: {fMessage, kAnyValue}, 3: {fVarint, 0}},
	kAnyValue:   {1: {fBytes, 0}, 2: {fVarint, 0}, 3: {fVarint, 0}, 4: {fFixed64, 0}, 5: {fMessage, kArrayValue}, 6: {fMessage, kKVList}, 7: {fBytes, 0}, 8: {fVarint, 0}},
	kArrayValue: {1: {fMessage, kAnyValue}},
	kKVList:     {1: {fMessage, kKeyValue}},
}

const maxDepth = 32

// schema is schemaMap as arrays, for speed: schema[kind][field number].
var schema = func() (t [kResource + 1][17]fieldSpec) {
	for k, fields := range schemaMap {
		for n, f := range fields {
			t[k][n] = f
		}
	}
	return t
}()

// validate checks b as a message of kind k and counts spans (messages of kind kSpan directly
// inside it, for kScopeSpans). It returns ok=false when it cannot vouch for b.
func validate(b []byte, k kind, depth int) (spans int, ok bool) {
	if depth > maxDepth {
		return 0, false
	}
	fields := &schema[k]
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return 0, false
		}
		b = b[n:]
		var spec fieldSpec
		if num < protowire.Number(len(fields)) {
			spec = fields[num]
		}
		known := spec.t != fUnknown
		switch typ {
		case protowire.VarintType:
			if known && spec.t != fVarint {
				return 0, false
			}
			_, n = protowire.ConsumeVarint(b)
		case protowire.Fixed64Type:
			if known && spec.t != fFixed64 {
				return 0, false
			}
			_, n = protowire.ConsumeFixed64(b)
		case protowire.Fixed32Type:
			if known && spec.t != fFixed32 {
				return 0, false
			}
			_, n = protowire.ConsumeFixed32(b)
		case protowire.BytesType:
			var v []byte
			v, n = protowire.ConsumeBytes(b)
			if n < 0 {
				return 0, false
			}
			if known {
				switch spec.t {
				case fBytes:
				case fID16:
					if len(v) != 0 && len(v) != 16 {
						return 0, false
					}
				case fID8:
					if len(v) != 0 && len(v) != 8 {
						return 0, false
					}
				case fMessage:
					if _, ok := validate(v, spec.sub, depth+1); !ok {
						return 0, false
					}
					if spec.sub == kSpan {
						spans++
					}
				default:
					return 0, false
				}
			}
		default: // groups and invalid wire types: let pdata decide
			return 0, false
		}
		if n < 0 {
			return 0, false
		}
		b = b[n:]
	}
	return spans, true
}

// fastRewrite validates req (an encoded ExportTraceServiceRequest) and returns it with attrs
// added to every resource lacking them, appended to dst, and its span count. ok=false means
// "use pdata": the input may still be valid.
func fastRewrite(dst, req []byte, attrs []attrKV) (out []byte, spans int, ok bool) {
	out = dst
	for len(req) > 0 {
		num, typ, n := protowire.ConsumeTag(req)
		if n < 0 || num != 1 || typ != protowire.BytesType {
			return dst, 0, false
		}
		req = req[n:]
		rs, n := protowire.ConsumeBytes(req)
		if n < 0 {
			return dst, 0, false
		}
		req = req[n:]
		var c int
		out, c, ok = rewriteResourceSpans(out, rs, attrs)
		if !ok {
			return dst, 0, false
		}
		spans += c
	}
	return out, spans, true
}

// rewriteResourceSpans appends field 1 of the request holding rs with its resource enriched.
func rewriteResourceSpans(out, rs []byte, attrs []attrKV) ([]byte, int, bool) {
	var resource []byte
	haveResource := false
	spans := 0
	for b := rs; len(b) > 0; {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 || typ != protowire.BytesType {
			return out, 0, false
		}
		b = b[n:]
		v, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return out, 0, false
		}
		b = b[n:]
		switch num {
		case 1:
			if haveResource {
				return out, 0, false // merged resources: pdata's business
			}
			resource, haveResource = v, true
			if _, ok := validate(v, kResource, 1); !ok {
				return out, 0, false
			}
		case 2:
			c, ok := validate(v, kScopeSpans, 1)
			if !ok {
				return out, 0, false
			}
			spans += c
		case 3: // schema_url
		default: // includes the deprecated instrumentation_library_spans that pdata migrates
			return out, 0, false
		}
	}
	var missing [][]byte
	extra := 0
	for _, a := range attrs {
		if !hasKey(resource, a.key) {
			missing = append(missing, a.encoded)
			extra += len(a.encoded)
		}
	}
	if extra == 0 {
		out = protowire.AppendTag(out, 1, protowire.BytesType)
		return protowire.AppendBytes(out, rs), spans, true
	}
	newResLen := len(resource) + extra
	resField := protowire.SizeTag(1) + protowire.SizeBytes(newResLen)
	rsLen := len(rs) + resField
	if haveResource {
		rsLen -= protowire.SizeTag(1) + protowire.SizeBytes(len(resource))
	}
	out = protowire.AppendTag(out, 1, protowire.BytesType)
	out = protowire.AppendVarint(out, uint64(rsLen))
	appendResource := func(out []byte) []byte {
		out = protowire.AppendTag(out, 1, protowire.BytesType)
		out = protowire.AppendVarint(out, uint64(newResLen))
		out = append(out, resource...)
		for _, m := range missing {
			out = append(out, m...)
		}
		return out
	}
	if !haveResource {
		out = appendResource(out)
	}
	for b := rs; len(b) > 0; {
		num, _, n := protowire.ConsumeTag(b)
		_, m := protowire.ConsumeBytes(b[n:])
		if num == 1 {
			out = appendResource(out)
		} else {
			out = append(out, b[:n+m]...)
		}
		b = b[n+m:]
	}
	return out, spans, true
}

// hasKey reports whether the (validated) Resource res has an attribute named key.
func hasKey(res []byte, key string) bool {
	for len(res) > 0 {
		num, typ, n := protowire.ConsumeTag(res)
		res = res[n:]
		n = protowire.ConsumeFieldValue(num, typ, res)
		if num == 1 && typ == protowire.BytesType {
			kv, _ := protowire.ConsumeBytes(res)
			var last []byte // a repeated field keeps its last value
			for len(kv) > 0 {
				knum, ktyp, kn := protowire.ConsumeTag(kv)
				kv = kv[kn:]
				if knum == 1 && ktyp == protowire.BytesType {
					last, _ = protowire.ConsumeBytes(kv)
				}
				kv = kv[protowire.ConsumeFieldValue(knum, ktyp, kv):]
			}
			if string(last) == key {
				return true
			}
		}
		res = res[n:]
	}
	return false
}
