package agent

import (
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"go.opentelemetry.io/collector/pdata/ptrace/ptraceotlp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	_ "google.golang.org/grpc/encoding/gzip" // the relay exports gzip-compressed
	"google.golang.org/grpc/peer"
)

// The upstream OTLP server of TestSpiffeOTLPRelay runs as a child process (this test
// binary again, with another gid) so that the SPIRE agent's unix attestor gives it an
// identity of its own. It talks to its parent through these environment variables and
// line-oriented stdout:
//
//	ADDR <listener> <host:port>       one per listener, once it serves
//	READY <its SPIFFE ID>             after every ADDR
//	SPANS <listener> <peer SPIFFE ID> <span id hex>...   per accepted Export call
//	REFUSED <listener> <handshake error>                 per failed TLS handshake
//
// It exits when its stdin closes (the parent ended or let it go).
const (
	spiffeOTLPHelperEnv    = "NODEAGENT_SPIFFE_OTLP_HELPER"
	spiffeOTLPSocketEnv    = "NODEAGENT_SPIFFE_OTLP_SOCKET"    // the SPIRE agent's Workload API socket
	spiffeOTLPListenersEnv = "NODEAGENT_SPIFFE_OTLP_LISTENERS" // name=authorised-id,name=authorised-id
)

// TestSpiffeOTLPServerHelper is not a test: TestSpiffeOTLPRelay runs it in a child
// process as the upstream collector.
func TestSpiffeOTLPServerHelper(t *testing.T) {
	if os.Getenv(spiffeOTLPHelperEnv) != "1" {
		t.Skip("helper process for TestSpiffeOTLPRelay")
	}
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	time.AfterFunc(3*time.Minute, func() { os.Exit(3) }) // never outlive a stuck parent for long

	out := &helperOut{}
	fail := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, format+"\n", args...)
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(
		workloadapi.WithAddr("unix://"+os.Getenv(spiffeOTLPSocketEnv))))
	cancel()
	if err != nil {
		fail("x509 source: %v", err)
	}
	svid, err := src.GetX509SVID()
	if err != nil {
		fail("x509 svid: %v", err)
	}
	for _, spec := range strings.Split(os.Getenv(spiffeOTLPListenersEnv), ",") {
		name, allowed, ok := strings.Cut(spec, "=")
		if !ok {
			fail("bad listener spec %q", spec)
		}
		id, err := spiffeid.FromString(allowed)
		if err != nil {
			fail("listener %s: %v", name, err)
		}
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			fail("listen: %v", err)
		}
		creds := reportingCreds{
			TransportCredentials: credentials.NewTLS(tlsconfig.MTLSServerConfig(src, src, tlsconfig.AuthorizeID(id))),
			name:                 name, out: out,
		}
		srv := grpc.NewServer(grpc.Creds(creds))
		ptraceotlp.RegisterGRPCServer(srv, &helperSink{name: name, out: out})
		go func() { _ = srv.Serve(lis) }()
		out.printf("ADDR %s %s", name, lis.Addr())
	}
	out.printf("READY %s", svid.ID)
	select {}
}

// helperOut serialises the helper's stdout lines.
type helperOut struct{ mu sync.Mutex }

func (o *helperOut) printf(format string, args ...any) {
	line := strings.ReplaceAll(fmt.Sprintf(format, args...), "\n", " ")
	o.mu.Lock()
	defer o.mu.Unlock()
	fmt.Println(line)
}

// reportingCreds are the server's TLS credentials, reporting every failed handshake.
type reportingCreds struct {
	credentials.TransportCredentials
	name string
	out  *helperOut
}

func (c reportingCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	nc, info, err := c.TransportCredentials.ServerHandshake(conn)
	if err != nil {
		c.out.printf("REFUSED %s %v", c.name, err)
	}
	return nc, info, err
}

func (c reportingCreds) Clone() credentials.TransportCredentials {
	return reportingCreds{TransportCredentials: c.TransportCredentials.Clone(), name: c.name, out: c.out}
}

// helperSink accepts every Export and reports its span IDs with the client's SPIFFE ID.
type helperSink struct {
	ptraceotlp.UnimplementedGRPCServer
	name string
	out  *helperOut
}

func (s *helperSink) Export(ctx context.Context, req ptraceotlp.ExportRequest) (ptraceotlp.ExportResponse, error) {
	client := "unknown"
	if p, ok := peer.FromContext(ctx); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.PeerCertificates) > 0 {
			if id, err := x509svid.IDFromCert(ti.State.PeerCertificates[0]); err == nil {
				client = id.String()
			}
		}
	}
	var ids []string
	rss := req.Traces().ResourceSpans()
	for i := 0; i < rss.Len(); i++ {
		sss := rss.At(i).ScopeSpans()
		for j := 0; j < sss.Len(); j++ {
			spans := sss.At(j).Spans()
			for k := 0; k < spans.Len(); k++ {
				id := spans.At(k).SpanID()
				ids = append(ids, hex.EncodeToString(id[:]))
			}
		}
	}
	s.out.printf("SPANS %s %s %s", s.name, client, strings.Join(ids, " "))
	return ptraceotlp.NewExportResponse(), nil
}
