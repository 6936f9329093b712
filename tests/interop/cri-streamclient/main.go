// Test client for auraed's CRI streaming server: the client-go code critest uses.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	remoteclient "k8s.io/client-go/tools/remotecommand"
	"sigs.k8s.io/cri-tools/pkg/common"
)

func main() {
	mode := flag.String("mode", "exec", "exec|pf")
	tty := flag.Bool("tty", false, "")
	stdin := flag.String("stdin", "", "stdin text (exec/attach); empty = no stdin")
	stdinHold := flag.Duration("hold", 0, "keep stdin open this long after writing")
	ws := flag.Bool("ws", false, "websocket")
	ports := flag.String("ports", "", "local:remote")
	send := flag.String("send", "", "pf: text to send on the forwarded connection")
	flag.Parse()
	u, err := url.Parse(flag.Arg(0))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	transport := common.TransportSpdy
	if *ws {
		transport = common.TransportWebsocket
	}
	switch *mode {
	case "exec":
		e, err := common.GetExecutor(transport, u, &rest.TLSClientConfig{Insecure: true})
		if err != nil {
			fmt.Fprintln(os.Stderr, "executor:", err)
			os.Exit(2)
		}
		var out, errb bytes.Buffer
		opts := remoteclient.StreamOptions{Stdout: &out, Tty: *tty}
		if !*tty {
			opts.Stderr = &errb
		}
		if *stdin != "" {
			r, w := io.Pipe()
			go func() {
				w.Write([]byte(strings.ReplaceAll(*stdin, `\n`, "\n")))
				time.Sleep(*stdinHold)
				w.Close()
			}()
			opts.Stdin = r
		}
		err = e.Stream(opts)
		fmt.Printf("STDOUT=%q\nSTDERR=%q\nERR=%v\n", out.String(), errb.String(), err)
	case "pf":
		d, err := common.GetDialer(transport, u, &rest.TLSClientConfig{Insecure: true})
		if err != nil {
			fmt.Fprintln(os.Stderr, "dialer:", err)
			os.Exit(2)
		}
		stop := make(chan struct{}, 1)
		ready := make(chan struct{})
		var o, eb bytes.Buffer
		pf, err := portforward.NewForStreaming(d, []string{*ports}, stop, ready, &o, &eb)
		if err != nil {
			fmt.Fprintln(os.Stderr, "pf:", err)
			os.Exit(2)
		}
		done := make(chan error, 1)
		go func() { done <- pf.ForwardPorts() }()
		select {
		case <-ready:
		case err := <-done:
			fmt.Printf("ERR=%v\n", err)
			os.Exit(1)
		}
		local := strings.Split(*ports, ":")[0]
		c, err := net.Dial("tcp", "127.0.0.1:"+local)
		if err != nil {
			fmt.Printf("ERR=%v\n", err)
			os.Exit(1)
		}
		c.Write([]byte(strings.ReplaceAll(*send, `\n`, "\n")))
		if tc, ok := c.(*net.TCPConn); ok {
			tc.CloseWrite()
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(c)
		fmt.Printf("RECV=%q\nERR=%v\nPFERR=%q\n", string(b), err, eb.String())
		close(stop)
	}
}
