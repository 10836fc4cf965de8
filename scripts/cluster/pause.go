// pause is the first process of every Pod sandbox on the test node: it holds the Pod's
// namespaces open, reaps the zombies it inherits as PID 1, and exits on SIGINT or SIGTERM.
// No registry is reachable here, so the sandbox image containerd runs is this program alone,
// built by build.sh and imported by node-up.sh.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
