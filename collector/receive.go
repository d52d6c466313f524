package collector

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"sync"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"go.opentelemetry.io/collector/pdata/ptrace/ptraceotlp"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
)

// ---- gRPC ----

// The gRPC service is registered by hand, with a pass-through codec, instead of through
// ptraceotlp.RegisterGRPCServer: grpc-go answers a request its codec cannot decode with
// codes.Internal, while OTLP asks for InvalidArgument. Decoding in the handler with
// ptraceotlp.ExportRequest.UnmarshalProto (which also migrates deprecated fields, as
// RegisterGRPCServer does) gives the right code.
var traceServiceDesc = grpc.ServiceDesc{
	ServiceName: "opentelemetry.proto.collector.trace.v1.TraceService",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Export",
		Handler: func(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			var in rawMsg
			if err := dec(&in); err != nil {
				return nil, err
			}
			return srv.(*runState).exportGRPC(ctx, in.b)
		},
	}},
	Streams:  []grpc.StreamDesc{},
	Metadata: "opentelemetry/proto/collector/trace/v1/trace_service.proto",
}

var emptyResponse = func() []byte {
	b, _ := ptraceotlp.NewExportResponse().MarshalProto()
	return b
}()

func (rn *runState) exportGRPC(_ context.Context, body []byte) (*rawMsg, error) {
	n, err := rn.ingestProto(body)
	if errors.Is(err, errInvalid) {
		rn.t.m.requests.WithLabelValues("grpc", outInvalid).Inc()
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if err := rn.result("grpc", n, err, grpcError); err != nil {
		return nil, err
	}
	return &rawMsg{b: emptyResponse}, nil
}

func backpressureStatus(msg string) error {
	st := status.New(codes.Unavailable, msg)
	if d, err := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(retryAfter)}); err == nil {
		st = d
	}
	return st.Err()
}

func grpcError(err error) error {
	switch {
	case errors.Is(err, errBackpressure), errors.Is(err, errDraining):
		return backpressureStatus(err.Error())
	case errors.Is(err, errTooLarge):
		return status.Error(codes.ResourceExhausted, err.Error())
	default:
		return status.Error(codes.Unavailable, err.Error())
	}
}

// result counts a request's outcome and maps err through conv.
func (rn *runState) result(transport string, spans int, err error, conv func(error) error) error {
	m := rn.t.m
	if err == nil {
		m.requests.WithLabelValues(transport, outOK).Inc()
		m.accepted.Add(float64(spans))
		return nil
	}
	m.refused.Add(float64(spans))
	switch {
	case errors.Is(err, errBackpressure), errors.Is(err, errDraining):
		m.requests.WithLabelValues(transport, outBackpressure).Inc()
	case errors.Is(err, errTooLarge):
		m.requests.WithLabelValues(transport, outTooLarge).Inc()
	default:
		m.requests.WithLabelValues(transport, outError).Inc()
	}
	return conv(err)
}

// tapHandle refuses new gRPC calls before their message is read while memory is over the limit.
func (rn *runState) tapHandle(ctx context.Context, _ *tap.Info) (context.Context, error) {
	if rn.t.mem.over() {
		rn.t.m.requests.WithLabelValues("grpc", outBackpressure).Inc()
		return ctx, backpressureStatus("relay memory over its limit")
	}
	return ctx, nil
}

func (rn *runState) newGRPCServer(maxSize int64) *grpc.Server {
	s := grpc.NewServer(
		grpc.MaxRecvMsgSize(int(maxSize)),
		grpc.InTapHandle(rn.tapHandle),
		grpc.ForceServerCodecV2(rawCodec{}),
	)
	s.RegisterService(&traceServiceDesc, rn)
	return s
}

// ---- HTTP ----

const (
	ctProto = "application/x-protobuf"
	ctJSON  = "application/json"
	// TracesPath is where OTLP/HTTP traces are posted.
	TracesPath = "/v1/traces"
)

var (
	gzipPool = sync.Pool{}
	zstdPool = sync.Pool{}
	bufPool  = sync.Pool{New: func() any { return new(bytes.Buffer) }}
)

type httpError struct {
	code int
	msg  string
}

func (rn *runState) httpHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc(TracesPath, rn.serveTraces)
	return mux
}

func (rn *runState) serveTraces(w http.ResponseWriter, r *http.Request) {
	ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		rn.t.m.requests.WithLabelValues("http", outUnsupported).Inc()
		writeStatus(w, ct, http.StatusMethodNotAllowed, "method "+r.Method+" not allowed; use POST")
		return
	}
	if ct != ctProto && ct != ctJSON {
		rn.t.m.requests.WithLabelValues("http", outUnsupported).Inc()
		writeStatus(w, ctJSON, http.StatusUnsupportedMediaType, "content type "+strconv.Quote(ct)+" not supported; use "+ctProto+" or "+ctJSON)
		return
	}
	live := rn.t.live()
	max := live.MaxRequestSize
	if r.ContentLength > max {
		rn.t.m.requests.WithLabelValues("http", outTooLarge).Inc()
		writeStatus(w, ct, http.StatusRequestEntityTooLarge, errTooLarge.Error())
		return
	}
	// Reserve memory for the body and its decoding before reading it.
	reserve := r.ContentLength
	if reserve < 0 {
		reserve = 64 << 10
	}
	reserve *= 3
	if !rn.t.mem.reserve(reserve) {
		rn.t.m.requests.WithLabelValues("http", outBackpressure).Inc()
		w.Header().Set("Retry-After", strconv.Itoa(int(retryAfter.Seconds())))
		writeStatus(w, ct, http.StatusServiceUnavailable, "relay memory over its limit")
		return
	}
	defer rn.t.mem.release(reserve)

	buf := bufPool.Get().(*bytes.Buffer)
	buf.Reset()
	defer func() {
		if buf.Cap() <= 4<<20 {
			bufPool.Put(buf)
		}
	}()
	if herr := readBody(buf, r, max); herr != nil {
		outcome := outInvalid
		switch herr.code {
		case http.StatusRequestEntityTooLarge:
			outcome = outTooLarge
		case http.StatusUnsupportedMediaType:
			outcome = outUnsupported
		}
		rn.t.m.requests.WithLabelValues("http", outcome).Inc()
		writeStatus(w, ct, herr.code, herr.msg)
		return
	}
	var n int
	var err error
	if ct == ctProto {
		n, err = rn.ingestProto(buf.Bytes())
	} else {
		req := ptraceotlp.NewExportRequest()
		if err = req.UnmarshalJSON(buf.Bytes()); err != nil {
			err = fmt.Errorf("%w: %w", errInvalid, err)
		} else {
			n, err = rn.ingest(req.Traces())
		}
	}
	if errors.Is(err, errInvalid) {
		rn.t.m.requests.WithLabelValues("http", outInvalid).Inc()
		writeStatus(w, ct, http.StatusBadRequest, err.Error())
		return
	}
	if err = rn.result("http", n, err, func(e error) error { return e }); err != nil {
		switch {
		case errors.Is(err, errTooLarge):
			writeStatus(w, ct, http.StatusRequestEntityTooLarge, err.Error())
		default:
			w.Header().Set("Retry-After", strconv.Itoa(int(retryAfter.Seconds())))
			writeStatus(w, ct, http.StatusServiceUnavailable, err.Error())
		}
		return
	}
	resp := ptraceotlp.NewExportResponse()
	var body []byte
	if ct == ctProto {
		body, _ = resp.MarshalProto()
	} else {
		body, _ = resp.MarshalJSON()
	}
	w.Header().Set("Content-Type", ct)
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body) // the client went away; nothing to do
}

// readBody reads the (decompressed) body into buf, at most max bytes.
func readBody(buf *bytes.Buffer, r *http.Request, max int64) *httpError {
	src := io.LimitReader(r.Body, max+1)
	switch enc := strings.ToLower(strings.TrimSpace(r.Header.Get("Content-Encoding"))); enc {
	case "", "identity":
	case "gzip", "x-gzip":
		zr, _ := gzipPool.Get().(*gzip.Reader)
		var err error
		if zr == nil {
			zr, err = gzip.NewReader(src)
		} else {
			err = zr.Reset(src)
		}
		if err != nil {
			return &httpError{http.StatusBadRequest, "gzip body: " + err.Error()}
		}
		defer gzipPool.Put(zr)
		src = zr
	case "zstd":
		zr, _ := zstdPool.Get().(*zstd.Decoder)
		var err error
		if zr == nil {
			zr, err = zstd.NewReader(src, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(uint64(max)+1), zstd.WithDecoderMaxWindow(uint64(min(max, 1<<30))))
		} else {
			err = zr.Reset(src)
		}
		if err != nil {
			return &httpError{http.StatusBadRequest, "zstd body: " + err.Error()}
		}
		defer func() {
			_ = zr.Reset(nil) // releases the body; cannot fail for nil
			zstdPool.Put(zr)
		}()
		src = zr
	default:
		return &httpError{http.StatusUnsupportedMediaType, "content encoding " + strconv.Quote(enc) + " not supported; use gzip or zstd"}
	}
	if _, err := buf.ReadFrom(io.LimitReader(src, max+1)); err != nil {
		if errors.Is(err, zstd.ErrDecoderSizeExceeded) || errors.Is(err, zstd.ErrWindowSizeExceeded) {
			return &httpError{http.StatusRequestEntityTooLarge, errTooLarge.Error()}
		}
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return &httpError{http.StatusRequestEntityTooLarge, errTooLarge.Error()}
		}
		return &httpError{http.StatusBadRequest, "read body: " + err.Error()}
	}
	if int64(buf.Len()) > max {
		return &httpError{http.StatusRequestEntityTooLarge, errTooLarge.Error()}
	}
	return nil
}

// writeStatus answers with a google.rpc.Status in the request's content type, as OTLP/HTTP asks.
func writeStatus(w http.ResponseWriter, ct string, code int, msg string) {
	st := &spb.Status{Code: int32(httpToGRPC(code)), Message: msg}
	var body []byte
	if ct == ctProto {
		body, _ = proto.Marshal(st)
	} else {
		ct = ctJSON
		body, _ = protojson.Marshal(st)
	}
	w.Header().Set("Content-Type", ct)
	w.WriteHeader(code)
	_, _ = w.Write(body)
}

func httpToGRPC(code int) codes.Code {
	switch code {
	case http.StatusBadRequest:
		return codes.InvalidArgument
	case http.StatusRequestEntityTooLarge:
		return codes.ResourceExhausted
	case http.StatusServiceUnavailable:
		return codes.Unavailable
	case http.StatusMethodNotAllowed, http.StatusUnsupportedMediaType:
		return codes.Unimplemented
	}
	return codes.Unknown
}
