package collector

import (
	"io"
	"sync"

	"github.com/klauspost/compress/gzip"
	"google.golang.org/grpc/encoding"
	// Imported so that it is initialised before this package, whose registration then wins
	// whatever else in the binary imports it.
	_ "google.golang.org/grpc/encoding/gzip"
)

// The relay registers its own gRPC "gzip" compressor (process-wide, replacing
// google.golang.org/grpc/encoding/gzip's): klauspost/compress at BestSpeed. The wire format is
// the same gzip, so any peer reads it; compressing exports with the standard library at its
// default level was more than half of the relay's CPU time under load.
func init() {
	c := &gzipCompressor{}
	c.w.New = func() any {
		zw, _ := gzip.NewWriterLevel(io.Discard, gzip.BestSpeed)
		return &gzipWriter{Writer: zw, pool: &c.w}
	}
	encoding.RegisterCompressor(c)
}

type gzipCompressor struct {
	w, r sync.Pool
}

type gzipWriter struct {
	*gzip.Writer
	pool *sync.Pool
}

type gzipReader struct {
	*gzip.Reader
	pool *sync.Pool
}

func (c *gzipCompressor) Name() string { return "gzip" }

func (c *gzipCompressor) Compress(w io.Writer) (io.WriteCloser, error) {
	z := c.w.Get().(*gzipWriter)
	z.Reset(w)
	return z, nil
}

func (z *gzipWriter) Close() error {
	defer z.pool.Put(z)
	return z.Writer.Close()
}

func (c *gzipCompressor) Decompress(r io.Reader) (io.Reader, error) {
	if z, ok := c.r.Get().(*gzipReader); ok {
		if err := z.Reset(r); err != nil {
			c.r.Put(z)
			return nil, err
		}
		return z, nil
	}
	zr, err := gzip.NewReader(r)
	if err != nil {
		return nil, err
	}
	return &gzipReader{Reader: zr, pool: &c.r}, nil
}

func (z *gzipReader) Close() error {
	defer z.pool.Put(z)
	return z.Reader.Close()
}
