// connhold opens many mTLS HTTP/2 connections to one server, makes a few requests on each
// and then holds them open and idle, for the connection scale curve (benches/e2e/scale.sh):
// how much memory and idle CPU a proxy's inbound spends per held connection.
//
//	connhold -addr 127.0.0.1:PORT -cert svid.pem -key key.pem -n 1000 [-requests 2] [-path /]
//	         [-parallel 100]
//
// Each connection is TLS 1.3 with the client certificate, ALPN h2 (the server's certificate
// is not verified: the proxy under test is the only server), then an HTTP/2 client
// connection (golang.org/x/net/http2) that sends -requests GETs of -path one after another
// and must get 200s. Connections are opened -parallel at a time, so the listen queue is not
// flooded. Once all are open it prints "held N connections" and keeps them until it gets
// SIGTERM or SIGINT; keepalive is the server's business (the client sends no PINGs of its
// own, and answers the server's). Any failure is printed and exits 1.
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/http2"
)

func main() {
	addr := flag.String("addr", "", "server HOST:PORT")
	certFile := flag.String("cert", "", "client certificate (PEM)")
	keyFile := flag.String("key", "", "client key (PEM)")
	n := flag.Int("n", 100, "connections to hold")
	requests := flag.Int("requests", 2, "requests on each connection before it idles")
	path := flag.String("path", "/", "request path")
	parallel := flag.Int("parallel", 100, "connections being opened at once")
	flag.Parse()
	if *addr == "" || *certFile == "" || *keyFile == "" {
		fail("-addr, -cert and -key are required")
	}
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		fail("client certificate: %v", err)
	}
	config := &tls.Config{
		Certificates:       []tls.Certificate{cert},
		InsecureSkipVerify: true,
		NextProtos:         []string{"h2"},
		MinVersion:         tls.VersionTLS13,
	}
	transport := &http2.Transport{}
	held := make([]*http2.ClientConn, *n)
	errs := make(chan error, *n)
	slots := make(chan struct{}, *parallel)
	var wg sync.WaitGroup
	for i := 0; i < *n; i++ {
		wg.Add(1)
		slots <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-slots }()
			cc, err := open(transport, config, *addr, *path, *requests)
			if err != nil {
				errs <- fmt.Errorf("connection %d: %w", i, err)
				return
			}
			held[i] = cc
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		fail("%v", err)
	}
	fmt.Printf("held %d connections (%d requests each)\n", *n, *requests)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	for _, cc := range held {
		_ = cc.Close()
	}
}

// open dials one mTLS connection, starts HTTP/2 on it and makes `requests` calls.
func open(t *http2.Transport, config *tls.Config, addr, path string, requests int) (*http2.ClientConn, error) {
	dialer := &net.Dialer{Timeout: 30 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn, err := (&tls.Dialer{NetDialer: dialer, Config: config}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	tc := conn.(*tls.Conn)
	if p := tc.ConnectionState().NegotiatedProtocol; p != "h2" {
		_ = conn.Close()
		return nil, fmt.Errorf("ALPN %q, not h2", p)
	}
	cc, err := t.NewClientConn(conn)
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	for r := 0; r < requests; r++ {
		req, err := http.NewRequestWithContext(ctx, "GET", "https://"+addr+path, nil)
		if err != nil {
			return nil, err
		}
		resp, err := cc.RoundTrip(req)
		if err != nil {
			_ = cc.Close()
			return nil, err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		if resp.StatusCode != 200 {
			_ = cc.Close()
			return nil, fmt.Errorf("request %d: HTTP %d", r, resp.StatusCode)
		}
	}
	return cc, nil
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "connhold: "+format+"\n", args...)
	os.Exit(1)
}
