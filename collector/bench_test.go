package collector

import (
	"testing"

	"go.opentelemetry.io/collector/pdata/ptrace"
	"go.opentelemetry.io/collector/pdata/ptrace/ptraceotlp"
)

// The receive-side cost per request of 512 spans: the fast path against pdata's
// decode, enrich and encode (what the relay did before, and what the collector does).
func BenchmarkReceive512(b *testing.B) {
	td, _ := makeTraces("bench", 512)
	body := protoBody(b, td)
	attrs := map[string]string{"k8s.node.name": "node-a", "host.name": "host-a"}
	enc := encodeAttrs(attrs)
	b.Run("fastpath", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		var buf []byte
		for b.Loop() {
			out, _, ok := fastRewrite(buf[:0], body, enc)
			if !ok {
				b.Fatal("fast path declined a valid request")
			}
			buf = out
		}
	})
	b.Run("pdata", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		for b.Loop() {
			req := ptraceotlp.NewExportRequest()
			if err := req.UnmarshalProto(body); err != nil {
				b.Fatal(err)
			}
			enrich(req.Traces(), attrs)
			var m ptrace.ProtoMarshaler
			if _, err := m.MarshalTraces(req.Traces()); err != nil {
				b.Fatal(err)
			}
		}
	})
}
