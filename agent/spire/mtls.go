package spire

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// ErrNoSVID is returned by TLS handshakes made before the Workload API delivered the
// node's first X509-SVID.
var ErrNoSVID = errors.New("no x509-svid from the spire workload api yet")

// MTLSClientConfig is the package-level MTLSClientConfig on this subsystem's socket
// (HostRoot + Socket).
func (s *Spire) MTLSClientConfig(ctx context.Context, serverID spiffeid.ID) (*tls.Config, error) {
	o := s.options()
	return MTLSClientConfig(ctx, o.hostPath(o.Socket), serverID, s.log)
}

// MTLSConfigFunc adapts MTLSClientConfig to a TLS config provider such as the OTLP
// exporter's `TLSConfig func() (*tls.Config, error)`: the config (and its X509Source
// on the socket, kept until ctx is done) is made on the first call and the same one,
// which reads the current SVID on every handshake, is returned afterwards.
func (s *Spire) MTLSConfigFunc(ctx context.Context, serverID spiffeid.ID) func() (*tls.Config, error) {
	var (
		once sync.Once
		cfg  *tls.Config
		err  error
	)
	return func() (*tls.Config, error) {
		once.Do(func() { cfg, err = s.MTLSClientConfig(ctx, serverID) })
		return cfg, err
	}
}

// MTLSClientConfig returns a TLS client config (go-spiffe tlsconfig.MTLSClientConfig)
// that presents the node's X509-SVID from the Workload API at socketPath and accepts
// only a server whose SVID is serverID, verified against the trust bundle from the
// same API. It never blocks: an X509Source on the socket is opened in the background
// and kept until ctx is done; handshakes before its first SVID fail with ErrNoSVID (the
// caller's retry covers it). The SVID and bundle are read on every handshake, so each
// new connection uses the latest rotation. The one config is meant to be shared.
func MTLSClientConfig(ctx context.Context, socketPath string, serverID spiffeid.ID, log *slog.Logger) (*tls.Config, error) {
	if serverID.IsZero() {
		return nil, errors.New("mtls client config: empty server spiffe id")
	}
	src := &lazySource{path: socketPath}
	go src.run(ctx, log)
	return tlsconfig.MTLSClientConfig(src, src, tlsconfig.AuthorizeID(serverID)), nil
}

// lazySource is an x509svid.Source and x509bundle.Source that answers from an
// X509Source once one is open.
type lazySource struct {
	path string
	src  atomic.Pointer[workloadapi.X509Source]
}

func (l *lazySource) run(ctx context.Context, log *slog.Logger) {
	for {
		// NewX509Source blocks until the first X.509 context arrives (the watch inside
		// retries through an absent agent and PermissionDenied), or ctx is done.
		src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(clientOptions(l.path)...))
		if err == nil {
			l.src.Store(src)
			log.Info("x509 source for mtls ready", "socket", l.path)
			<-ctx.Done()
			l.src.Store(nil)
			_ = src.Close()
			return
		}
		if ctx.Err() != nil {
			return
		}
		log.Warn("x509 source for mtls", "socket", l.path, "error", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
}

// GetX509SVID implements x509svid.Source.
func (l *lazySource) GetX509SVID() (*x509svid.SVID, error) {
	src := l.src.Load()
	if src == nil {
		return nil, fmt.Errorf("%w at %s", ErrNoSVID, l.path)
	}
	return src.GetX509SVID()
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (l *lazySource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	src := l.src.Load()
	if src == nil {
		return nil, fmt.Errorf("%w at %s", ErrNoSVID, l.path)
	}
	return src.GetX509BundleForTrustDomain(td)
}
