package collector

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/klauspost/compress/gzip"
	"go.opentelemetry.io/collector/pdata/ptrace"
	"go.opentelemetry.io/collector/pdata/ptrace/ptraceotlp"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// sender delivers one encoded ExportTraceServiceRequest to the upstream.
// It returns the spans the upstream rejected in a partial success, with its message.
// Errors are *retryable (try again later) or anything else (permanent: never retried).
type sender interface {
	send(ctx context.Context, parts [][]byte) (rejected int64, msg string, err error)
	// probe checks that the upstream can be reached, without sending data.
	probe(ctx context.Context) error
	close() error
}

// retryable marks an error worth retrying; after is the upstream's hint (0: none).
type retryable struct {
	err   error
	after time.Duration
}

func (r *retryable) Error() string { return r.err.Error() }
func (r *retryable) Unwrap() error { return r.err }

func newSender(e Exporter) (sender, error) {
	switch e.Protocol {
	case "grpc":
		return newGRPCSender(e)
	case "http":
		return newHTTPSender(e)
	case "file":
		return newFileSender(e)
	}
	return nil, fmt.Errorf("unknown exporter protocol %q", e.Protocol)
}

func clientTLS(e Exporter) (*tls.Config, error) {
	if e.TLSConfig != nil {
		cfg, err := e.TLSConfig()
		if err != nil {
			return nil, fmt.Errorf("get exporter tls config: %w", err)
		}
		return cfg, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if e.CAFile != "" {
		pem, err := os.ReadFile(e.CAFile)
		if err != nil {
			return nil, fmt.Errorf("read exporter ca file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("exporter ca file %s: no PEM certificates", e.CAFile)
		}
		cfg.RootCAs = pool
	}
	if e.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(e.CertFile, e.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("load exporter client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// ---- gRPC ----

// rawCodec sends already-encoded ExportTraceServiceRequest bytes as they are, so batches built
// by concatenating queue records are never decoded again. Responses are decoded by ptraceotlp.
type rawCodec struct{}

type rawMsg struct {
	b     []byte
	parts [][]byte // when set, the message is their concatenation (sent without joining them)
}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	m := v.(*rawMsg)
	if m.parts == nil {
		return mem.BufferSlice{mem.SliceBuffer(m.b)}, nil
	}
	bs := make(mem.BufferSlice, len(m.parts))
	for i, p := range m.parts {
		bs[i] = mem.SliceBuffer(p)
	}
	return bs, nil
}

func join(parts [][]byte) []byte {
	if len(parts) == 1 {
		return parts[0]
	}
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	out := make([]byte, 0, n)
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	v.(*rawMsg).b = data.Materialize()
	return nil
}

func (rawCodec) Name() string { return "proto" }

const exportMethod = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

type grpcSender struct {
	cc   *grpc.ClientConn
	md   metadata.MD
	opts []grpc.CallOption
	tls  *tls.Config // nil when insecure; the health probe handshakes with it
}

func newGRPCSender(e Exporter) (*grpcSender, error) {
	creds := insecure.NewCredentials()
	var tlsCfg *tls.Config
	if !e.Insecure {
		cfg, err := clientTLS(e)
		if err != nil {
			return nil, err
		}
		creds = credentials.NewTLS(cfg)
		tlsCfg = cfg
	}
	cc, err := grpc.NewClient(e.Endpoint,
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20)),
		// gRPC's own reconnect backoff grows to 120 s by default and would add to the
		// relay's retry after an upstream (or the first SVID) comes back late.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           grpcbackoff.Config{BaseDelay: time.Second, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 5 * time.Second},
			MinConnectTimeout: 10 * time.Second,
		}),
	)
	if err != nil {
		return nil, fmt.Errorf("create grpc client for %s: %w", e.Endpoint, err)
	}
	s := &grpcSender{cc: cc, md: metadata.New(e.Headers), opts: []grpc.CallOption{grpc.ForceCodecV2(rawCodec{})}, tls: tlsCfg}
	if strings.EqualFold(e.Compression, "gzip") {
		s.opts = append(s.opts, grpc.UseCompressor("gzip"))
	}
	return s, nil
}

func (s *grpcSender) send(ctx context.Context, parts [][]byte) (int64, string, error) {
	if len(s.md) > 0 {
		ctx = metadata.NewOutgoingContext(ctx, s.md)
	}
	var out rawMsg
	err := s.cc.Invoke(ctx, exportMethod, &rawMsg{parts: parts}, &out, s.opts...)
	if err != nil {
		return 0, "", classifyGRPC(err)
	}
	resp := ptraceotlp.NewExportResponse()
	if err := resp.UnmarshalProto(out.b); err != nil {
		return 0, "", nil // accepted; an unreadable response body does not undo that
	}
	ps := resp.PartialSuccess()
	return ps.RejectedSpans(), ps.ErrorMessage(), nil
}

// classifyGRPC follows the OTLP spec's list of retryable codes.
func classifyGRPC(err error) error {
	st, _ := status.FromError(err)
	var hint time.Duration
	hasHint := false
	for _, d := range st.Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok && ri.RetryDelay != nil {
			hint, hasHint = ri.RetryDelay.AsDuration(), true
		}
	}
	switch st.Code() {
	case codes.Canceled, codes.DeadlineExceeded, codes.Aborted, codes.OutOfRange, codes.Unavailable, codes.DataLoss:
		return &retryable{err: err, after: hint}
	case codes.ResourceExhausted:
		if hasHint {
			return &retryable{err: err, after: hint}
		}
	}
	return err
}

func (s *grpcSender) probe(ctx context.Context) error { return dialProbe(ctx, s.cc.Target(), s.tls) }

func (s *grpcSender) close() error { return s.cc.Close() }

// dialProbe connects to the upstream and, over TLS, completes a handshake: a TCP
// connect alone would call an upstream reachable whose certificate (or SPIFFE ID) we
// will never accept, or that will never accept ours.
func dialProbe(ctx context.Context, hostport string, tlsCfg *tls.Config) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", hostport)
	if err != nil {
		return err
	}
	defer c.Close()
	if tlsCfg == nil {
		return nil
	}
	cfg := tlsCfg.Clone()
	if cfg.ServerName == "" {
		cfg.ServerName, _, _ = net.SplitHostPort(hostport)
	}
	tc := tls.Client(c, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("tls handshake: %w", err)
	}
	// Under TLS 1.3 the server checks our certificate after its Finished: one read
	// surfaces its refusal (a short deadline, since an accepting server sends nothing).
	_ = tc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if _, err := tc.Read(make([]byte, 1)); err != nil && !isTimeout(err) && !errors.Is(err, io.EOF) {
		return fmt.Errorf("tls: upstream refused us: %w", err)
	}
	return nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// ---- HTTP ----

type httpSender struct {
	url     string
	host    string
	tls     *tls.Config // nil for plain http; the health probe handshakes with it
	client  *http.Client
	headers map[string]string
	gzip    bool
}

func newHTTPSender(e Exporter) (*httpSender, error) {
	raw := e.Endpoint
	if !strings.Contains(raw, "://") {
		scheme := "https"
		if e.Insecure {
			scheme = "http"
		}
		raw = scheme + "://" + raw
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("parse exporter endpoint: %w", err)
	}
	if u.Path == "" || u.Path == "/" {
		u.Path = TracesPath
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = 16
	tr.Proxy = nil
	if u.Scheme == "https" {
		cfg, err := clientTLS(e)
		if err != nil {
			return nil, err
		}
		tr.TLSClientConfig = cfg
	}
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), map[string]string{"https": "443", "http": "80"}[u.Scheme])
	}
	return &httpSender{url: u.String(), host: host, client: &http.Client{Transport: tr}, headers: e.Headers,
		gzip: strings.EqualFold(e.Compression, "gzip"), tls: tr.TLSClientConfig}, nil
}

func (s *httpSender) send(ctx context.Context, parts [][]byte) (int64, string, error) {
	body := join(parts)
	var rd io.Reader = bytes.NewReader(body)
	if s.gzip {
		var zb bytes.Buffer
		zw, _ := gzip.NewWriterLevel(&zb, gzip.BestSpeed)
		if _, err := zw.Write(body); err != nil {
			return 0, "", fmt.Errorf("compress export: %w", err)
		}
		if err := zw.Close(); err != nil {
			return 0, "", fmt.Errorf("compress export: %w", err)
		}
		rd = &zb
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.url, rd)
	if err != nil {
		return 0, "", fmt.Errorf("build export request: %w", err)
	}
	req.Header.Set("Content-Type", ctProto)
	if s.gzip {
		req.Header.Set("Content-Encoding", "gzip")
	}
	for k, v := range s.headers {
		req.Header.Set(k, v)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return 0, "", &retryable{err: err}
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		er := ptraceotlp.NewExportResponse()
		if strings.HasPrefix(resp.Header.Get("Content-Type"), ctJSON) {
			_ = er.UnmarshalJSON(data)
		} else {
			_ = er.UnmarshalProto(data)
		}
		ps := er.PartialSuccess()
		return ps.RejectedSpans(), ps.ErrorMessage(), nil
	case resp.StatusCode == http.StatusTooManyRequests, resp.StatusCode == http.StatusBadGateway,
		resp.StatusCode == http.StatusServiceUnavailable, resp.StatusCode == http.StatusGatewayTimeout:
		return 0, "", &retryable{err: fmt.Errorf("upstream answered %s", resp.Status), after: parseRetryAfter(resp.Header.Get("Retry-After"))}
	default:
		return 0, "", fmt.Errorf("upstream answered %s: %s", resp.Status, bytes.TrimSpace(data[:min(len(data), 200)]))
	}
}

func parseRetryAfter(v string) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(v); err == nil && s >= 0 {
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(time.Until(t), 0)
	}
	return 0
}

func (s *httpSender) probe(ctx context.Context) error { return dialProbe(ctx, s.host, s.tls) }

func (s *httpSender) close() error {
	s.client.CloseIdleConnections()
	return nil
}

// ---- file ----

// fileSender appends one OTLP/JSON ExportTraceServiceRequest per line.
type fileSender struct {
	path string
	mu   sync.Mutex
	f    *os.File
}

func newFileSender(e Exporter) (*fileSender, error) {
	return &fileSender{path: e.Path}, nil
}

func (s *fileSender) send(_ context.Context, parts [][]byte) (int64, string, error) {
	body := join(parts)
	var u ptrace.ProtoUnmarshaler
	td, err := u.UnmarshalTraces(body)
	if err != nil {
		return 0, "", fmt.Errorf("decode queued batch: %w", err)
	}
	var m ptrace.JSONMarshaler
	line, err := m.MarshalTraces(td)
	if err != nil {
		return 0, "", fmt.Errorf("encode json: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.f == nil {
		if err := os.MkdirAll(filepath.Dir(s.path), 0o755); err != nil {
			return 0, "", &retryable{err: fmt.Errorf("create directory for %s: %w", s.path, err)}
		}
		f, err := os.OpenFile(s.path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return 0, "", &retryable{err: fmt.Errorf("open %s: %w", s.path, err)}
		}
		s.f = f
	}
	line = append(line, '\n')
	if _, err := s.f.Write(line); err != nil {
		return 0, "", &retryable{err: fmt.Errorf("write %s: %w", s.path, err)}
	}
	return 0, "", nil
}

func (s *fileSender) probe(context.Context) error { return dirUsable(filepath.Dir(s.path)) }

func (s *fileSender) close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.f == nil {
		return nil
	}
	err := s.f.Close()
	s.f = nil
	return err
}
