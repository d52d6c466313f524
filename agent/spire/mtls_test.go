package spire

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	grpchealth "google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/nodeagent/nodeagent/agent/spire/fakeworkload"
)

// mtlsServer is a TLS server that requires a client SVID authorised by authorize and
// reports the leaf of every client it accepted.
type mtlsServer struct {
	addr  string
	peers chan *x509.Certificate
}

func startMTLSServer(t *testing.T, svid *x509svid.SVID, ca *fakeworkload.CA, authorize tlsconfig.Authorizer) *mtlsServer {
	t.Helper()
	cfg := tlsconfig.MTLSServerConfig(svid, bundleSet(ca), authorize)
	lis, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lis.Close() })
	s := &mtlsServer{addr: lis.Addr().String(), peers: make(chan *x509.Certificate, 16)}
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			go func() {
				defer func() { _ = c.Close() }()
				tc := c.(*tls.Conn)
				_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
				if err := tc.Handshake(); err != nil {
					return
				}
				s.peers <- tc.ConnectionState().PeerCertificates[0]
				_, _ = tc.Write([]byte("ok"))
			}()
		}
	}()
	return s
}

// dial makes one new connection with cfg and returns the handshake error.
func (s *mtlsServer) dial(cfg *tls.Config) error {
	d := &tls.Dialer{Config: cfg, NetDialer: &net.Dialer{Timeout: 5 * time.Second}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", s.addr)
	if err != nil {
		return err
	}
	defer func() { _ = c.Close() }()
	buf := make([]byte, 2)
	_, err = c.Read(buf) // TLS 1.3: the server's verdict on the client cert arrives here
	return err
}

func parseSVID(t *testing.T, ca *fakeworkload.CA, id spiffeid.ID) *x509svid.SVID {
	t.Helper()
	w, err := ca.SVID(id, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	s, err := x509svid.ParseRaw(w.X509Svid, w.X509SvidKey)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestMTLSClientConfig(t *testing.T) {
	root := shortTempDir(t)
	sock := filepath.Join(root, "api.sock")
	fake := fakeworkload.New(sock)
	if err := fake.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fake.Stop)
	ca, err := fakeworkload.NewCA(testTD)
	if err != nil {
		t.Fatal(err)
	}
	serverID := spiffeid.RequireFromPath(testTD, "/collector")
	srv := startMTLSServer(t, parseSVID(t, ca, serverID), ca, tlsconfig.AuthorizeID(testNodeID))

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := MTLSClientConfig(ctx, sock, spiffeid.ID{}, testLog(t)); err == nil {
		t.Errorf("MTLSClientConfig with an empty server ID: got nil error; want one")
	}
	cfg, err := MTLSClientConfig(ctx, sock, serverID, testLog(t))
	if err != nil {
		t.Fatal(err)
	}

	// No identity yet: handshakes fail, nothing blocks.
	if err := srv.dial(cfg); err == nil {
		t.Fatalf("handshake before any SVID: got nil error; want failure")
	}

	now := time.Now()
	first, err := ca.SVID(testNodeID, now.Add(-time.Minute), now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	fake.SetX509(first)
	var leaf *x509.Certificate
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := srv.dial(cfg)
		if err == nil {
			leaf = <-srv.peers
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no successful handshake within 10s of the SVID; last: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got, _ := x509svid.IDFromCert(leaf); got != testNodeID {
		t.Errorf("server saw client %s; want %s", got, testNodeID)
	}
	firstSerial := leaf.SerialNumber

	// Rotation: the next new connection presents the new SVID.
	second, err := ca.SVID(testNodeID, now, now.Add(2*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	fake.SetX509(second)
	deadline = time.Now().Add(10 * time.Second)
	for {
		if err := srv.dial(cfg); err != nil {
			t.Fatalf("handshake after rotation: %v", err)
		}
		leaf = <-srv.peers
		if leaf.SerialNumber.Cmp(firstSerial) != 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("rotated SVID not presented within 10s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !leaf.NotAfter.Equal(now.Add(2 * time.Hour).Truncate(time.Second)) {
		t.Errorf("got client cert expiring %v; want the rotated one (%v)", leaf.NotAfter, now.Add(2*time.Hour))
	}

	// A server with another ID is refused by the client.
	wrong := startMTLSServer(t, parseSVID(t, ca, spiffeid.RequireFromPath(testTD, "/impostor")), ca, tlsconfig.AuthorizeAny())
	if err := wrong.dial(cfg); err == nil || !strings.Contains(err.Error(), "unexpected ID") {
		t.Errorf("handshake with spiffe://example.org/impostor: got %v; want an unexpected ID error", err)
	}

	// A server that does not authorise this node refuses it.
	picky := startMTLSServer(t, parseSVID(t, ca, serverID), ca, tlsconfig.AuthorizeID(spiffeid.RequireFromPath(testTD, "/someone-else")))
	if err := picky.dial(cfg); err == nil {
		t.Errorf("handshake with a server that authorises only someone else: got nil error; want failure")
	}
}

func TestSpireMTLSClientConfigUsesSocket(t *testing.T) {
	f := newFixture(t, nil)
	if err := os.MkdirAll(filepath.Dir(f.fake.Path()), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := f.fake.Start(); err != nil {
		t.Fatal(err)
	}
	f.fake.SetX509(f.svid(time.Now().Add(-time.Minute), time.Now().Add(time.Hour)))
	serverID := spiffeid.RequireFromPath(testTD, "/collector")
	srv := startMTLSServer(t, parseSVID(t, f.ca, serverID), f.ca, tlsconfig.AuthorizeID(testNodeID))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cfg, err := f.sp.MTLSClientConfig(ctx, serverID)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := srv.dial(cfg)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no handshake within 10s: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// After ctx is done the source is closed: handshakes fail with ErrNoSVID.
	cancel()
	deadline = time.Now().Add(5 * time.Second)
	for {
		_, err := cfg.GetClientCertificate(&tls.CertificateRequestInfo{})
		if errors.Is(err, ErrNoSVID) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("GetClientCertificate after cancel: got %v; want ErrNoSVID", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestMTLSConfigFuncGRPC uses the provider the way the OTLP exporter does: one gRPC
// client with credentials.NewTLS over the provided config, to a gRPC server that
// authorises only the node's SPIFFE ID.
func TestMTLSConfigFuncGRPC(t *testing.T) {
	f := newFixture(t, nil)
	if err := os.MkdirAll(filepath.Dir(f.fake.Path()), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := f.fake.Start(); err != nil {
		t.Fatal(err)
	}
	f.fake.SetX509(f.svid(time.Now().Add(-time.Minute), time.Now().Add(time.Hour)))
	serverID := spiffeid.RequireFromPath(testTD, "/collector")

	serve := func(authorize tlsconfig.Authorizer) string {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		g := grpc.NewServer(grpc.Creds(credentials.NewTLS(tlsconfig.MTLSServerConfig(parseSVID(t, f.ca, serverID), bundleSet(f.ca), authorize))))
		healthpb.RegisterHealthServer(g, grpchealth.NewServer())
		go func() { _ = g.Serve(lis) }()
		t.Cleanup(g.Stop)
		return lis.Addr().String()
	}
	check := func(addr string, provider func() (*tls.Config, error)) error {
		cfg, err := provider()
		if err != nil {
			return err
		}
		cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
		if err != nil {
			return err
		}
		defer func() { _ = cc.Close() }()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err = healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
		return err
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	provider := f.sp.MTLSConfigFunc(ctx, serverID)
	good := serve(tlsconfig.AuthorizeID(testNodeID))
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := check(good, provider)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("gRPC health over SPIFFE mTLS: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	a, _ := provider()
	b, _ := provider()
	if a != b {
		t.Errorf("provider returned different configs; want one shared config")
	}

	refusing := serve(tlsconfig.AuthorizeID(spiffeid.RequireFromPath(testTD, "/someone-else")))
	if err := check(refusing, provider); status.Code(err) != codes.Unavailable {
		t.Errorf("gRPC to a server that does not authorise the node: got %v; want Unavailable (handshake refused)", err)
	}
	wrongID := f.sp.MTLSConfigFunc(ctx, spiffeid.RequireFromPath(testTD, "/not-the-collector"))
	deadline = time.Now().Add(10 * time.Second)
	for {
		err := check(good, wrongID)
		if err != nil && strings.Contains(err.Error(), "unexpected ID") {
			break
		}
		if time.Now().After(deadline) || (err != nil && !errors.Is(err, ErrNoSVID) && !strings.Contains(err.Error(), ErrNoSVID.Error())) {
			t.Fatalf("gRPC expecting another server ID: got %v; want an unexpected ID refusal", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
